"""The sans-IO tunnel: pure state machines driven by datagrams and explicit time.

Nothing in this package touches sockets, event loops or the wall clock; every
entry point takes ``now`` (seconds, any monotonic origin).
"""
