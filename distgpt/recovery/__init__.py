"""Failure handling without Ray: what went wrong (``Failure``), what to do about it (``policy``), how hangs are noticed
(``watchdog``), and fault injection for drills (``faults``). The orchestrator executes the decisions."""
