"""``edgeq.report``: the package, and -- called -- the Python API's ``edgeq.api.report`` (see ``edgeq._callable``)."""

from edgeq._callable import make_callable

make_callable(__name__)
