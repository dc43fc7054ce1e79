"""R1 against R3: what three copies of every stream cost, measured in one run on one cluster.

The cluster is three nats-server nodes on this machine (``devstack.cluster``), each fsyncing
every write (``sync_interval: always``) as the embedded server does.

- **JetStream publish, R1 and R3**: the publish limit's method (``limits.publish_and_consume``:
  one-transaction messages, ``publish_async`` pipelined, every ack awaited) on streams of one
  copy, then of three; the R3 figure's ratio is R3/R1.
- **end-to-end, R1 and R3**: the end-to-end throughput run (``end_to_end.throughput``) with every
  service given all three nodes in NATS_URL and ``PFLEA_STREAM_REPLICAS`` 1, then 3; the R3
  figure's ratio is R3/R1.

Both pairs run on the same nodes, so the replicas are the only difference. The three nodes
share this machine's cores and disk with the services, which separate machines would not:
the R3 cost here is an upper bound on the CPU side, and a lower one on the network side.
"""

from __future__ import annotations

import dataclasses

from bench.end_to_end import throughput
from bench.harness import Harness
from bench.limits import publish_and_consume
from bench.processes import RssSampler
from bench.report import Figure
from bench.servers import nats_cluster


async def run(h: Harness) -> None:
    async with nats_cluster(h.servers) as servers:
        on_cluster = dataclasses.replace(h, servers=servers)
        n = min(h.sizes.limit_messages, len(h.workload()))
        r1, _ = await publish_and_consume(servers.nats_url, h, consume=False, replicas=1)
        r3, _ = await publish_and_consume(servers.nats_url, h, consume=False, replicas=3)
        note = f"{n:,} one-transaction messages to a 3-node cluster, as the JetStream publish limit"
        h.add(Figure("cluster", "JetStream publish, R1", r1, "msgs/s", note=note))
        h.add(Figure("cluster", "JetStream publish, R3", r3, "msgs/s", "publish, R1", r1, note=note))
        rss = RssSampler(0.5)
        rss.start()
        try:
            e1 = await throughput(dataclasses.replace(on_cluster, replicas=1), rss, variant=", cluster R1")
            e3 = await throughput(dataclasses.replace(on_cluster, replicas=3), rss, variant=", cluster R3")
        finally:
            await rss.stop()
        h.add(
            Figure(
                "cluster",
                "end-to-end, R3",
                e3.value,
                "events/s",
                "end-to-end, R1",
                e1.value,
                note="simulator → 4 read models on the 3-node cluster; the runs' notes are the "
                "end-to-end figures ', cluster R1' and ', cluster R3'",
            )
        )
