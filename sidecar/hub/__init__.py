"""The hub side of metrics through partitions.

On a host whose agent is a hub (the users' ObservabilityHub), agentvisor receives the
batches other hosts' forwarders send (`wire`), keeps each (host, agent, seq) once with
its high-water marks on disk (`receiver`), and hands every original push, in order, to
the local legacy hub agent, which stays as it is (`delivery`). `python -m sidecar.hub`
runs it on its own; the supervisor will run it inside the sidecar's data process.
"""
