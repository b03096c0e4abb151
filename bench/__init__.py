"""The Presence benchmark harness: a real node (`twistd -n presence`) driven by lean load-generator
processes, compared in the same run with a plain Autobahn broadcast server and a raw socket floor.

    python -m bench run --connections 19000     (full run; --quick for a small one)

Modules: __main__ (command line), scenarios (what is measured, in order), generator (a load
generator process), wsclient (the lean websocket client), probe (the event-loop stall probe),
node (issuer, store seeding, the node process), fleet (talking to the child processes),
reference_autobahn and reference_floor (the references), report (tables and targets), profile
(py-spy hot spots). Two more scenarios, each its own command: crossnode (`python -m bench
cross-node`: three nodes on one PostgreSQL, devices on A, the application on B and C; pg makes and
drops its database) and notifications (`python -m bench notify`: an application posting live
notifications, with poster, to devices on one node). docs/performance.md has the results and how
to read them. `python -m bench hostile` (hostile, hostile_attacks, hostile_client) runs each attack of
issue 14 against a node with a healthy device beside it; its table is in docs/security.md.
"""
