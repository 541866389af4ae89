"""Import ffcv without losing torch's intra-op threads.

ffcv 1.0.2's ``ffcv.pipeline.compiler`` calls ``torch.set_num_threads(1)`` (and numba's) when it is first imported, so
every torch op after the first ffcv import of a process ran on one thread: FFCV training, .beton evaluation and the
whole test session after its first ffcv test (docs/performance.md, "Threads"). Every entry point into ffcv
(``check_beton``, ``FFCVLoader``, ``BetonSplit``, ``write_beton``, ``ffcv_decode``) imports this module before
its ffcv imports; it imports ffcv's compiler once and puts torch's thread count back. ffcv's ``Loader`` resizes the pool
again when built; :mod:`pipeline.load.ffcv_loader` and :mod:`evaluation.eval_loaders` restore it there.
"""

import torch

_threads = torch.get_num_threads()
import ffcv.pipeline.compiler  # noqa: E402,F401  (the import with the side effect)

torch.set_num_threads(_threads)
