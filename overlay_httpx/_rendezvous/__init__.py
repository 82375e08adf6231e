"""Discovery: the rendezvous server, its registry store and protocol, and the node's client."""
