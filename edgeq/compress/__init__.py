"""``edgeq.compress``: the package, and -- called -- the Python API's ``edgeq.api.compress`` (see ``edgeq._callable``)."""

from edgeq._callable import make_callable

make_callable(__name__)
