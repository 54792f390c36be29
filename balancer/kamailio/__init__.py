"""Kamailio's dispatcher follows the balancer's live view: health to state, spare capacity to
weights, published over JSON-RPC (jsonrpcs over xhttp) to one or more Kamailio instances."""
