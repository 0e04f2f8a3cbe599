"""What arrives: the spool (durable files), the journal (SQLite) and the assembler (when a plan is whole)."""
