"""A job's way through the node: node wiring, the pipeline (seal, compute, merge), RT Dose, outbox."""
