//! What [`LoadedSnapshot::load_for_host`] and the chain walk check, on synthetic snapshots in
//! a temporary store: no /dev/kvm needed (host facts are passed in, memory is only mapped).

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use forkd_store::{RemoveMode, Snapshot, SnapshotMeta, Store, Tag, MEMORY_FILE, VMSTATE_FILE};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};

use super::chain::{self, ChainError, ChainLink};
use super::memory_file::{Extent, RegionSpec};
use super::persist::{DeviceList, MachineState};
use super::restore::{LoadedSnapshot, RestoreError};
use super::vmstate_file::{self, HostFacts, VmStateError, VMSTATE_FORMAT_VERSION};
use super::{error_chain, MAX_CHAIN_DEPTH};
use crate::devices::legacy::SerialDeviceState;
use crate::devices::virtio::VirtioDevicesState;
use crate::memory::{Bytes, GuestAddress, PAGE_SIZE};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

const PAGES: u64 = 8;
const MEM: u64 = PAGES * PAGE_SIZE as u64;

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

fn host() -> HostFacts {
    HostFacts::sample(&[0x10, 0x1b, 0x6e0])
}

fn layout() -> Vec<RegionSpec> {
    vec![RegionSpec {
        guest_addr: 0,
        size: MEM,
        file_offset: 0,
    }]
}

fn vcpu() -> VcpuState {
    VcpuState::sample()
}

fn machine(chain: Option<ChainLink>) -> MachineState {
    MachineState {
        memory: layout(),
        vcpus: vec![vcpu()],
        vm: VmState {
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
        },
        serial: SerialDeviceState(Default::default()),
        devices: DeviceList::default(),
        block_id: String::new(),
        virtio: VirtioDevicesState {
            transports: Vec::new(),
            vsock: None,
        },
        kernel: "builtin:test".into(),
        initrd: None,
        cmdline: String::new(),
        chain,
        vmgenid: None,
    }
}

/// A store in a temporary directory.
struct Lab {
    _dir: tempfile::TempDir,
    store: Store,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        Lab { _dir: dir, store }
    }

    /// Publishes `state` as `name`, with memory.bin holding byte `value` at the start of each
    /// listed page (and holes elsewhere); `edit` may rewrite the vmstate.json text first.
    fn publish_with(
        &self,
        name: &str,
        state: &MachineState,
        pages: &[(u64, u8)],
        edit: impl FnOnce(String) -> String,
    ) -> Snapshot {
        let staging = self.store.begin(&tag(name)).unwrap();
        let mem = std::fs::File::create(staging.path().join(MEMORY_FILE)).unwrap();
        mem.set_len(super::memory_file::total_size(&state.memory))
            .unwrap();
        for &(page, value) in pages {
            mem.write_all_at(&[value], page * PAGE_SIZE as u64).unwrap();
        }
        let text = edit(vmstate_file::encode(state, &host()).unwrap());
        std::fs::write(staging.path().join(VMSTATE_FILE), text).unwrap();
        let link = state.chain.as_ref();
        staging
            .commit(SnapshotMeta {
                memory_mib: 0,
                vcpus: state.vcpus.len() as u32,
                description: "synthetic".into(),
                parent_tag: link.map(|l| Tag::parse(&l.parent_tag).unwrap()),
                parent_sha256: link
                    .map(|l| l.parent_manifest_sha256.clone())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .unwrap()
    }

    fn publish(&self, name: &str, state: &MachineState, pages: &[(u64, u8)]) -> Snapshot {
        self.publish_with(name, state, pages, |t| t)
    }

    /// A full snapshot `name` whose pages hold their index + 1.
    fn root(&self, name: &str) -> Snapshot {
        let pages: Vec<(u64, u8)> = (0..PAGES).map(|p| (p, p as u8 + 1)).collect();
        self.publish(name, &machine(None), &pages)
    }

    /// A diff snapshot `name` over `parent` storing page `page` with `value`.
    fn diff(&self, name: &str, parent: &Snapshot, page: u64, value: u8) -> Snapshot {
        let state = machine(Some(link_to(parent, page)));
        self.publish(name, &state, &[(page, value)])
    }

    fn load(&self, name: &str) -> Result<LoadedSnapshot, RestoreError> {
        LoadedSnapshot::load_for_host(&self.store, &tag(name), &host())
    }

    fn file(&self, name: &str, file: &str) -> std::path::PathBuf {
        self.store.snapshot_dir(&tag(name)).join(file)
    }
}

fn link_to(parent: &Snapshot, page: u64) -> ChainLink {
    ChainLink {
        parent_tag: parent.tag().to_string(),
        parent_manifest_sha256: parent.manifest_sha256().unwrap(),
        parent_content_sha256: parent.manifest.content_sha256(),
        extents: vec![Extent {
            offset: page * PAGE_SIZE as u64,
            len: PAGE_SIZE as u64,
        }],
    }
}

fn writable(path: &Path) {
    let mut p = std::fs::metadata(path).unwrap().permissions();
    p.set_mode(p.mode() | 0o200);
    std::fs::set_permissions(path, p).unwrap();
}

fn page_byte(loaded: &LoadedSnapshot, page: u64) -> u8 {
    loaded
        .memory()
        .read_obj::<u8>(GuestAddress(page * PAGE_SIZE as u64))
        .unwrap()
}

/// The error and its causes on one line, as the CLI prints it.
fn message(err: &RestoreError) -> String {
    let text = error_chain(err);
    assert!(!text.contains('\n'), "one line: {text:?}");
    text
}

#[test]
fn a_full_snapshot_loads_without_kvm() {
    let lab = Lab::new();
    lab.root("base");
    let loaded = lab.load("base").unwrap();
    assert!(loaded.ancestors().is_empty());
    assert_eq!(loaded.vcpus(), 1);
    assert_eq!(loaded.state().vcpus[0].regs.rip, 0x10_0000);
    for page in 0..PAGES {
        assert_eq!(page_byte(&loaded, page), page as u8 + 1);
    }
}

#[test]
fn a_chain_maps_each_diff_over_its_parent() {
    let lab = Lab::new();
    let root = lab.root("root");
    let d1 = lab.diff("d1", &root, 1, 0xa1);
    lab.diff("d2", &d1, 2, 0xa2);
    let loaded = lab.load("d2").unwrap();
    assert_eq!(loaded.ancestors(), &[tag("d1"), tag("root")]);
    assert_eq!(page_byte(&loaded, 0), 1, "root page");
    assert_eq!(page_byte(&loaded, 1), 0xa1, "d1's page");
    assert_eq!(page_byte(&loaded, 2), 0xa2, "d2's page");
    assert_eq!(page_byte(&loaded, 3), 4, "root page");
}

#[test]
fn a_missing_parent_is_named() {
    let lab = Lab::new();
    let root = lab.root("root");
    let d1 = lab.diff("d1", &root, 1, 0xa1);
    lab.diff("d2", &d1, 2, 0xa2);
    lab.store
        .remove(&[tag("root")], RemoveMode::Orphan)
        .unwrap();
    let err = lab.load("d2").unwrap_err();
    let text = message(&err);
    assert!(
        matches!(
            &err,
            RestoreError::Chain(ChainError::MissingParent { tag, parent })
                if tag.as_str() == "d1" && parent == "root"
        ),
        "{text}"
    );
    assert!(
        text.contains("\"d1\": broken chain: its parent \"root\" does not exist"),
        "{text}"
    );
}

#[test]
fn a_replaced_parent_is_refused() {
    let lab = Lab::new();
    let root = lab.root("root");
    lab.diff("d1", &root, 1, 0xa1);
    lab.store
        .remove(&[tag("root")], RemoveMode::Orphan)
        .unwrap();
    lab.publish("root", &machine(None), &[(0, 0x77)]);
    let err = lab.load("d1").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::ParentReplaced { parent, .. }) if parent.as_str() == "root"),
        "{err:?}"
    );
    assert!(message(&err).contains("was replaced"), "{err}");
}

#[test]
fn a_parent_with_the_same_files_under_a_new_manifest_still_carries_its_links() {
    // What installing a pack does: the parent's files are the ones the link was made against,
    // its manifest (time, package, description) is not.
    let lab = Lab::new();
    let root = lab.root("root");
    lab.diff("d1", &root, 1, 0xa1);
    let before = root.manifest_sha256().unwrap();
    lab.store
        .remove(&[tag("root")], RemoveMode::Orphan)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = lab.root("root");
    assert_ne!(again.manifest_sha256().unwrap(), before);
    assert_eq!(
        again.manifest.content_sha256(),
        root.manifest.content_sha256()
    );
    let loaded = lab.load("d1").unwrap();
    assert_eq!(loaded.ancestors(), [tag("root")]);
}

#[test]
fn an_edited_parent_vmstate_is_refused_by_its_manifest_hash() {
    let lab = Lab::new();
    let root = lab.root("root");
    lab.diff("d1", &root, 1, 0xa1);
    let path = lab.file("root", VMSTATE_FILE);
    writable(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("\"cmdline\": \"", "\"cmdline\": \" ", 1),
    )
    .unwrap();
    let err = lab.load("d1").unwrap_err();
    let text = message(&err);
    assert!(
        matches!(
            &err,
            RestoreError::Chain(ChainError::VmState {
                source: VmStateError::NotAsManifested { .. },
                ..
            })
        ),
        "{text}"
    );
    assert!(
        text.starts_with("snapshot \"root\": ")
            && text.contains("does not match its snapshot's manifest"),
        "{text}"
    );
}

#[test]
fn an_old_format_version_is_refused_naming_both_versions() {
    let lab = Lab::new();
    let old = VMSTATE_FORMAT_VERSION - 1;
    let to_old = |text: String| {
        text.replace(
            &format!("\"format_version\": {VMSTATE_FORMAT_VERSION}"),
            &format!("\"format_version\": {old}"),
        )
    };
    lab.publish_with("old", &machine(None), &[], to_old);
    let err = lab.load("old").unwrap_err();
    assert!(
        matches!(
            &err,
            RestoreError::VmState {
                source: VmStateError::Version { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let path = lab.file("old", VMSTATE_FILE);
    assert_eq!(
        message(&err),
        format!(
            "snapshot \"old\": vmstate {}: format version {old} is not supported (this forkd \
             reads version {VMSTATE_FORMAT_VERSION}); rebuild the snapshot",
            path.display()
        )
    );

    // An ancestor written by an older forkd is refused the same way by the chain walk.
    let parent = lab.publish_with("old-parent", &machine(None), &[], to_old);
    lab.diff("new-kid", &parent, 1, 1);
    let err = lab.load("new-kid").unwrap_err();
    let text = message(&err);
    assert!(
        matches!(
            &err,
            RestoreError::Chain(ChainError::VmState {
                source: VmStateError::Version { .. },
                ..
            })
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "format version {old} is not supported (this forkd reads version {VMSTATE_FORMAT_VERSION})"
        )),
        "{text}"
    );
}

#[test]
fn another_host_is_refused_saying_what_differs() {
    let lab = Lab::new();
    lab.root("base");
    let here = HostFacts {
        cpu_vendor: "AuthenticAMD".into(),
        kvm_caps: vec!["irqchip".into()],
        ..host()
    };
    let err = LoadedSnapshot::load_for_host(&lab.store, &tag("base"), &here).unwrap_err();
    let text = message(&err);
    assert!(
        matches!(
            &err,
            RestoreError::VmState {
                source: VmStateError::IncompatibleHost { .. },
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("incompatible host")
            && text.contains("GenuineIntel")
            && text.contains("AuthenticAMD")
            && text.contains("KVM capabilities missing here: xsave"),
        "{text}"
    );
    let fewer_msrs = HostFacts {
        msrs: vec![0x10, 0x6e0],
        ..host()
    };
    let err = LoadedSnapshot::load_for_host(&lab.store, &tag("base"), &fewer_msrs).unwrap_err();
    assert!(
        message(&err).ends_with("incompatible host: MSRs this host's KVM cannot restore: 0x1b"),
        "{err}"
    );
    let close = HostFacts {
        tsc_khz: 2_000_100,
        cpu_model: 86,
        msrs: vec![0x10, 0x1b, 0x6e0, 0xda0],
        ..host()
    };
    LoadedSnapshot::load_for_host(&lab.store, &tag("base"), &close)
        .expect("a close TSC and another model of the same family restore");
}

#[test]
fn cycles_are_refused() {
    let lab = Lab::new();
    // A snapshot that names itself as its parent.
    let own = ChainLink {
        parent_tag: "selfish".into(),
        parent_manifest_sha256: "0".repeat(64),
        parent_content_sha256: String::new(),
        extents: Vec::new(),
    };
    lab.publish("selfish", &machine(Some(own)), &[]);
    let err = lab.load("selfish").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::Cycle { .. })),
        "{err:?}"
    );
    assert!(message(&err).contains("\"selfish\" appears twice (a cycle)"));

    // a -> b -> a: b's link to a cannot carry a's real hash (a's own file holds b's), but
    // the walk sees a twice before comparing any hash.
    let back = ChainLink {
        parent_tag: "a".into(),
        parent_manifest_sha256: "0".repeat(64),
        parent_content_sha256: String::new(),
        extents: Vec::new(),
    };
    let b = lab.publish("b", &machine(Some(back)), &[]);
    lab.diff("a", &b, 0, 1);
    let err = lab.load("a").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::Cycle { parent, .. }) if parent.as_str() == "a"),
        "{err:?}"
    );
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let lab = Lab::new();
    let mut parent = lab.root("l0");
    for depth in 1..=3 {
        parent = lab.diff(&format!("l{depth}"), &parent, depth, depth as u8);
    }
    let top = lab.store.get(&tag("l3")).unwrap();
    let (_, state): (HostFacts, MachineState) =
        vmstate_file::load(&top.dir.join(VMSTATE_FILE)).unwrap();
    let walk = |max| {
        chain::walk_limited(
            &lab.store,
            &tag("l3"),
            &top.dir,
            &state.memory,
            state.chain.as_ref(),
            max,
        )
    };
    let ok = walk(3).unwrap();
    assert_eq!(ok.ancestors.len(), 3);
    assert_eq!(ok.layers.len(), 4);
    assert_eq!(ok.layers[0].extents, None, "root first, all of its pages");
    let err = walk(2).unwrap_err();
    assert!(
        matches!(&err, ChainError::TooDeep { max: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("deeper than 2 links"), "{err}");
    assert!(
        lab.load("l3").is_ok(),
        "3 links are well within {MAX_CHAIN_DEPTH}"
    );
}

#[test]
fn a_parent_with_another_memory_layout_is_refused() {
    let lab = Lab::new();
    let mut bigger = machine(None);
    bigger.memory[0].size = 2 * MEM;
    let parent = lab.publish("big", &bigger, &[]);
    lab.diff("small", &parent, 0, 1);
    let err = lab.load("small").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::LayoutMismatch { .. })),
        "{err:?}"
    );
    assert!(message(&err).contains("different memory layout"));
}

#[test]
fn an_invalid_parent_tag_is_refused() {
    let lab = Lab::new();
    let link = ChainLink {
        parent_tag: "not a tag!".into(),
        parent_manifest_sha256: "0".repeat(64),
        parent_content_sha256: String::new(),
        extents: Vec::new(),
    };
    // The manifest cannot name such a parent; only the (checksummed) vmstate.json does.
    let staging_state = machine(Some(link));
    let staging = lab.store.begin(&tag("odd")).unwrap();
    let mem = std::fs::File::create(staging.path().join(MEMORY_FILE)).unwrap();
    mem.set_len(MEM).unwrap();
    std::fs::write(
        staging.path().join(VMSTATE_FILE),
        vmstate_file::encode(&staging_state, &host()).unwrap(),
    )
    .unwrap();
    staging.commit(SnapshotMeta::default()).unwrap();
    let err = lab.load("odd").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::BadParentTag { .. })),
        "{err:?}"
    );
    assert!(message(&err).contains("its parent tag \"not a tag!\" is not a valid tag"));
}

#[test]
fn a_parent_without_vmstate_is_refused() {
    let lab = Lab::new();
    let staging = lab.store.begin(&tag("bare")).unwrap();
    std::fs::File::create(staging.path().join(MEMORY_FILE))
        .unwrap()
        .set_len(MEM)
        .unwrap();
    let bare = staging.commit(SnapshotMeta::default()).unwrap();
    lab.diff("kid", &bare, 0, 1);
    let err = lab.load("kid").unwrap_err();
    assert!(
        matches!(&err, RestoreError::Chain(ChainError::NoVmState { tag }) if tag.as_str() == "bare"),
        "{err:?}"
    );
}

#[test]
fn bad_states_are_refused_before_any_vm_exists() {
    let lab = Lab::new();
    let mut none = machine(None);
    none.vcpus.clear();
    lab.publish("no-vcpus", &none, &[]);
    let err = lab.load("no-vcpus").unwrap_err();
    assert!(message(&err).contains("holds no vCPUs"), "{err}");

    let mut disk = machine(None);
    disk.devices.block = true;
    lab.publish("no-disk", &disk, &[]);
    let err = lab.load("no-disk").unwrap_err();
    assert!(message(&err).contains("rootfs.ext4 is missing"), "{err}");

    lab.root("short");
    let path = lab.file("short", MEMORY_FILE);
    writable(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(MEM / 2)
        .unwrap();
    let err = lab.load("short").unwrap_err();
    let text = message(&err);
    assert!(matches!(err, RestoreError::Memory { .. }), "{text}");
    assert!(
        text.contains(&format!("{} bytes but guest RAM needs {MEM}", MEM / 2)),
        "{text}"
    );

    let err = lab.load("nothing").unwrap_err();
    assert!(matches!(err, RestoreError::UnknownTag(_)), "{err:?}");
}

#[test]
fn the_device_list_records_a_net_device_and_reads_lists_without_one() {
    use super::persist::NetDevice;
    use crate::devices::virtio::net::DEFAULT_MAC;

    let with = DeviceList {
        net: Some(NetDevice {
            mac: DEFAULT_MAC,
            tap: "tap0".into(),
        }),
        ..DeviceList::default()
    };
    let json = serde_json::to_value(&with).unwrap();
    assert_eq!(
        json["net"],
        serde_json::json!({"mac": "06:00:ac:10:00:02", "tap": "tap0"})
    );
    let back: DeviceList = serde_json::from_value(json).unwrap();
    assert_eq!(back, with);
    // Lists written before virtio-net existed (and lists without one) have no "net" key.
    let without = serde_json::to_value(DeviceList::default()).unwrap();
    assert!(without.get("net").is_none(), "{without}");
    let old: DeviceList = serde_json::from_str(
        r#"{"block":false,"block_read_only":false,"vsock":true,"vsock_cid":3,"rng":true}"#,
    )
    .unwrap();
    assert_eq!(old.net, None);
}
