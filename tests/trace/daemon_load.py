"""A client generating back to back on a daemon while a test traces it."""
import contextlib
import threading

from kvmm_daemon.client import Client


@contextlib.contextmanager
def generating(socket: str, *, max_tokens: int, timeout: float = 60):
    """Requests of `max_tokens` tokens one after another, in a thread, until the block ends."""
    stop = threading.Event()

    def load():
        with Client(socket, timeout=timeout) as c:
            while not stop.is_set():
                c.generate(token_ids=[1, 2, 3, 4], max_tokens=max_tokens, ignore_eos=True)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(timeout)
