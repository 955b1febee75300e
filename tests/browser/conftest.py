import pytest


# Playwright's sync API runs its own event loop in this thread for the whole module; the
# in-process Jupyter server fixtures (and their loop) are not used here.
@pytest.fixture(autouse=True)
def jp_asyncio_loop():
    yield None


@pytest.fixture(autouse=True)
def jp_server_cleanup():
    yield
