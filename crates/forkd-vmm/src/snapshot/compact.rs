//! `forkd compact`: flattens a chain of diff snapshots into one self-contained snapshot.

use std::fs::File;

use forkd_store::{Snapshot, SnapshotMeta, Store, Tag, MEMORY_FILE, ROOTFS_FILE, VMSTATE_FILE};

use super::memory_file;
use super::restore::LoadedSnapshot;
use super::save::{io_err, SnapshotError};
use super::vmstate_file;

/// Flattens `from` (any chain depth) into a new self-contained snapshot `to`: its memory
/// assembled from the chain, its state without a chain link, its disk copied sparsely.
pub fn compact(store: &Store, from: &Tag, to: &Tag) -> Result<Snapshot, SnapshotError> {
    let loaded = LoadedSnapshot::load(store, from).map_err(|source| SnapshotError::Compact {
        from: from.clone(),
        source: Box::new(source),
    })?;
    let staging = store.begin(to)?;
    let mem_path = staging.path().join(MEMORY_FILE);
    let out = File::create(&mem_path).map_err(io_err(&mem_path))?;
    memory_file::write_full(loaded.memory(), &out)?;
    out.sync_all().map_err(io_err(&mem_path))?;
    let mut state = loaded.state().clone();
    state.chain = None;
    let vmstate_path = staging.path().join(VMSTATE_FILE);
    std::fs::write(
        &vmstate_path,
        vmstate_file::encode(&state, loaded.saved_host())?,
    )
    .map_err(io_err(&vmstate_path))?;
    let rootfs = loaded.dir().join(ROOTFS_FILE);
    if rootfs.exists() {
        let dest = staging.path().join(ROOTFS_FILE);
        forkd_store::sparse::copy_sparse(&rootfs, &dest).map_err(io_err(&dest))?;
    }
    let m = loaded.manifest();
    Ok(staging.commit(SnapshotMeta {
        memory_mib: m.memory_mib,
        vcpus: m.vcpus,
        description: format!("compacted from {from}"),
        base_image: m.base_image.clone(),
        kernel: m.kernel.clone(),
        parent_tag: None,
        parent_sha256: String::new(),
        net: m.net.clone(),
    })?)
}
