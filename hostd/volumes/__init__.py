"""Persistent volumes: disks that outlive sandboxes (see docs/persistence.md)."""

from hostd.volumes.manager import VolumeManager, check_mount_path, check_volume_id
from hostd.volumes.mount import VolumeMountError, mount_in_guest, mount_script, run_in_guest
from hostd.volumes.service import VolumeServicer, add_to_server
from hostd.volumes.store import VolumeRecord, VolumeStore

__all__ = [
    "VolumeManager",
    "VolumeMountError",
    "VolumeRecord",
    "VolumeServicer",
    "VolumeStore",
    "add_to_server",
    "check_mount_path",
    "check_volume_id",
    "mount_in_guest",
    "mount_script",
    "run_in_guest",
]
