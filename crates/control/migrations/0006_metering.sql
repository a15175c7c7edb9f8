-- cairn metadata, schema version 6: meter segments (R10) and tenant quotas.
-- A resource's billed bytes as a step function: each row holds `bytes` from start_ms until
-- end_ms (NULL: still open). A change closes the open row and opens the next, so rows of one
-- resource never overlap and leave no gap while it exists. Rows outlive their resource: they
-- are the billing record.
CREATE TABLE meter_segments (
    resource_id TEXT NOT NULL,
    -- Milliseconds since the Unix epoch, UTC.
    start_ms BIGINT NOT NULL,
    end_ms BIGINT,
    tenant_id TEXT NOT NULL,
    -- 'volume', 'snapshot', 'template' or 'backup'.
    kind TEXT NOT NULL,
    -- The resource's name when the row was opened (it is shown after the resource is gone).
    name TEXT NOT NULL,
    -- A backup's VM and restore point (its disks taken at one instant): a VM's first
    -- restore points are free.
    vm_id TEXT,
    group_id TEXT,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (resource_id, start_ms)
);
CREATE INDEX meter_segments_open ON meter_segments (tenant_id, end_ms);
-- JSON: {"max_bytes"?, "max_volumes"?, "max_snapshots"?, "max_backups"?}; NULL: no limits.
ALTER TABLE tenants ADD COLUMN quota TEXT;
