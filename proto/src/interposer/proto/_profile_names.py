"""Names of the storage profiles (see :mod:`interposer.proto.profiles`).

Kept apart from the profile definitions so that ``policy.py`` can validate a
profile name without importing the layers the profiles expand into.
"""

from typing import Literal

ProfileName = Literal["gp3", "gp2", "io2", "st1", "pd-standard", "pd-balanced", "pd-ssd", "premium-ssd",
                      "premium-ssd-v2", "efs", "filestore-basic-hdd", "filestore-basic-ssd",
                      "filestore-zonal", "wan-nfs", "s3", "s3-express", "gcs", "azure-blob", "hdd-7200"]
