"""Spawns 10 sandboxes, lists them, kills them (FORKD_TAG: the snapshot, default `demo`)."""
import os

from forkd import Sandbox

sandboxes = Sandbox.create(os.environ.get("FORKD_TAG", "demo"), count=10, metadata={"example": "spawn_ten"})
print(f"{len(Sandbox.list(metadata={'example': 'spawn_ten'}))} sandboxes running")
for sandbox in sandboxes:
    print(sandbox.id, sandbox.info.state, f"restored in {sandbox.info.restore_ms:.1f} ms")
    sandbox.kill()
print(f"{len(Sandbox.list(metadata={'example': 'spawn_ten'}))} left")
