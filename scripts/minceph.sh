#!/bin/bash
# minceph.sh start|stop DIR -- a real single-node Ceph for tests (one monitor,
# one BlueStore OSD on a sparse 4 GiB file, no manager), all state under DIR,
# every socket on 127.0.0.1, auth off, pool `rbd` created and initialised.
# `stop` stops exactly the daemons `start` started (by pid). Needs Debian's
# ceph-mon, ceph-osd and ceph-common. Port 3300 is fixed: one cluster at a time.
# Used by tests/suite/export_ceph.rs; cold start about 11 s.
set -euo pipefail
CMD=$1; D=$2; C=(-c "$D/ceph.conf")
stop() {
  for f in "$D/osd.pid" "$D/mon.pid"; do
    [ -f "$f" ] || continue; p=$(cat "$f")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true; rm -f "$f"
  done
}
if [ "$CMD" = stop ]; then stop; exit 0; fi
[ "$CMD" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ ! -f "$D/ceph.conf" ] || { echo "$D already holds a cluster" >&2; exit 1; }
FSID=$(uuidgen); mkdir -p "$D"/{run,log,mon/ceph-a,osd/ceph-0}
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon_host = v2:127.0.0.1:3300
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = $D/run
log_file = $D/log/\$cluster-\$name.log
mon_data = $D/mon/\$cluster-\$id
osd_data = $D/osd/\$cluster-\$id
mon_data_avail_warn = 1
mon_data_avail_crit = 0
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_crush_chooseleaf_type = 0
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 4294967296
osd_memory_target = 939524096
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
CONF
monmaptool --create --fsid "$FSID" --addv a '[v2:127.0.0.1:3300]' "$D/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap"
# The daemons' output goes to files: a caller reading a pipe would hang.
ceph-mon "${C[@]}" -i a -f </dev/null >>"$D/log/mon.out" 2>&1 & echo $! > "$D/mon.pid"
OSD_UUID=$(uuidgen)
# `ceph` waits forever for a monitor that is down: always under timeout.
timeout 30 ceph "${C[@]}" osd new "$OSD_UUID" >/dev/null
ceph-osd "${C[@]}" -i 0 --mkfs --osd-uuid "$OSD_UUID" >>"$D/log/mkfs.log" 2>&1
ceph-osd "${C[@]}" -i 0 -f </dev/null >>"$D/log/osd.out" 2>&1 & echo $! > "$D/osd.pid"
for _ in $(seq 300); do
  timeout 10 ceph "${C[@]}" osd dump 2>/dev/null | grep -q '^osd.0 up' && break; sleep 0.2
done
timeout 10 ceph "${C[@]}" osd dump | grep -q '^osd.0 up' || { echo "osd did not come up" >&2; stop; exit 1; }
timeout 30 ceph "${C[@]}" osd pool create rbd 8 8 >/dev/null
timeout 60 rbd "${C[@]}" pool init rbd
echo "ceph ready: export CEPH_CONF=$D/ceph.conf"
