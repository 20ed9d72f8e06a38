"""confmig: live migration of confidential virtual machines."""

import os

# numpy's OpenBLAS starts a pool of worker threads at import, and they spin for a while. confmig
# does no linear algebra; on a 2-core host those threads took CPU from the vCPU processes and
# from migrations that started right after a process did. Every confmig process imports this
# package before numpy, so one thread is set here (a value the user set is kept).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
