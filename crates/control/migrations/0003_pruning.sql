-- cairn metadata, schema version 3: deleting backups and jobs that report.
-- A deleted backup's row goes in the same transaction that adds its record here; the record
-- is then forgotten in the repository and this row removed. A crash in between leaves the
-- row, and the next start (or delete) finishes the work.
CREATE TABLE pending_forgets (
    record_id TEXT PRIMARY KEY,
    since TEXT NOT NULL
);
-- What a finished job reports (JSON), for jobs that report more than success: verify, gc.
ALTER TABLE jobs ADD COLUMN result TEXT;
