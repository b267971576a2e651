"""The sidecar's data process: the work on agents' data that may block on a disk or wait
on a hub (spool writes, forwarding to the hubs; later log shipping and gzip).

It runs in its own process (`python -m sidecar.data`), handed its listening sockets by
the supervisor like the proxy process, so an fsync or a slow hub never stalls the proxy's
event loop, and a crash of either process loses nothing: what an agent was answered is on
disk, and the sockets wait in the kernel's backlog while the process restarts.

  ingest     agents' metric pushes over HTTP/1.1, appended to the spool in group commits
  reads      the reads reaching an ingest listener, relayed to the proxy (--reads-to)
  __main__   the process: spool, ingest listeners, forwarder, sync timer, /ready, /status

Not compiled by mypyc (not in `sidecar.HOT_PATH`), and it imports nothing of the proxy's
hot path.
"""
