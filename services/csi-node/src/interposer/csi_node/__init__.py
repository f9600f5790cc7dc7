"""interposer csi-node: the CSI Identity and Node services of the ``fs.interposer.io`` driver.

Run it with ``python -m interposer.csi_node --endpoint unix:///path/csi.sock ...``.
"""

from ._config import DRIVER_NAME as DRIVER_NAME
from ._config import CsiNodeConfig as CsiNodeConfig
from ._identity import IdentityService as IdentityService
from ._kubernetes import KubernetesLauncher as KubernetesLauncher
from ._kubernetes import WorkerPodSettings as WorkerPodSettings
from ._launcher import Launcher as Launcher
from ._launcher import LocalProcessLauncher as LocalProcessLauncher
from ._launcher import WorkerSpec as WorkerSpec
from ._node import CsiError as CsiError
from ._node import NodeService as NodeService
from ._server import CsiNodeServer as CsiNodeServer
from ._worker_tuning import WorkerTuning as WorkerTuning
