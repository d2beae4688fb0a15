"""What the processes of a launch do together: collectives beside DDP's (``collectives``), the failure
watch that ends every process with one line (``failures``), agreement on outcomes (``agreement``),
BatchNorm across processes (``batchnorm``). May import ``errors``, ``host_side`` and ``rundir``; nothing
from ``train``, ``sweep``, ``analysis`` or ``cli``."""
