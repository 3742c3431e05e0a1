"""Forward noising processes: pure math, no state (marginal, posterior, drift/diffusion, prior, log-SNR, grids).

:data:`PROCESSES` is the catalogue of config names (``vp``, ``ve``, ``vp-sde``, ``subvp-sde``, ``ve-sde``);
:class:`TimeGrid` / :func:`make_grid` the time grid every sampler walks."""

from diffusionlab.processes.base import GaussianProcess
from diffusionlab.processes.discrete import GaussianChain, VEChain, VPChain
from diffusionlab.processes.sde import LinearSDE, SubVPSDE, VESDE, VPSDE
from diffusionlab.processes.catalogue import PROCESSES, build_process, make_process, resolve_process  # noqa: E402
from diffusionlab.processes.grid import GRID_KINDS, TimeGrid, make_grid  # noqa: E402

__all__ = ["GaussianProcess", "GaussianChain", "VPChain", "VEChain", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE",
           "PROCESSES", "build_process", "make_process", "resolve_process", "TimeGrid", "make_grid", "GRID_KINDS"]
