-- cairn metadata, schema version 8: each backup's share of the backup repository, as the latest
-- garbage collection counted it (NULL until one has): the stored bytes of the blobs it alone
-- references (what forgetting it frees) and of those other backups reference too.
ALTER TABLE backups ADD COLUMN exclusive_bytes BIGINT;
ALTER TABLE backups ADD COLUMN shared_bytes BIGINT;
