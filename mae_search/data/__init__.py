"""Images for a trial: in memory (memory.py), one reader per format (sources.py), prepared once into shards
(prepare.py, read back by shards.py) and streamed (stream.py); load.py is what training calls.
Imports only ``config``, ``metrics`` and ``storage``; Ray only in prepare's tasks."""
