-- cairn metadata, schema version 9: each backup's attributed bytes as the latest garbage
-- collection counted them (NULL until one has): the stored bytes of the blobs it is the oldest
-- backup to reference. Backups are billed on them once counted, on their added bytes before.
ALTER TABLE backups ADD COLUMN attributed_bytes BIGINT;
