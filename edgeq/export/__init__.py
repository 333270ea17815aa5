"""``edgeq.export``: the package, and -- called -- the Python API's ``edgeq.api.export`` (see ``edgeq._callable``)."""

from edgeq._callable import make_callable

make_callable(__name__)
