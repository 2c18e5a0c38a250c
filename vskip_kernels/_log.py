"""The package's logger. Fall-back notices and other operational messages go here, not to
print(): configure or silence them with ``logging.getLogger("vskip_kernels")``. Without any
logging configuration, Python's last-resort handler still shows warnings on stderr."""

import logging

logger = logging.getLogger("vskip_kernels")
