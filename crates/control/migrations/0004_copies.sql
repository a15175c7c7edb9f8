-- cairn metadata, schema version 4: copies of backups in second repositories.
-- A copy keeps its backup's record id in the second repository, named here by the
-- repository's configured name.
CREATE TABLE backup_copies (
    backup_id TEXT NOT NULL,
    repository TEXT NOT NULL,
    copied_at TEXT NOT NULL,
    PRIMARY KEY (backup_id, repository)
);
-- Records to forget now name their repository: '' for the backup repository, else a second
-- repository's name.
CREATE TABLE pending_forgets_in (
    repository TEXT NOT NULL,
    record_id TEXT NOT NULL,
    since TEXT NOT NULL,
    PRIMARY KEY (repository, record_id)
);
INSERT INTO pending_forgets_in (repository, record_id, since) SELECT '', record_id, since FROM pending_forgets;
DROP TABLE pending_forgets;
