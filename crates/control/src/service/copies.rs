//! Second repositories (R12's off-site copy): backups copied there incrementally, listed with
//! their copies, and restorable from there when the backup repository is lost.

use cairn_backup::Repository;

use super::pruning::blocking;

use super::*;

impl Control {
    /// The repository of that name: "" is the backup repository; others are the configured
    /// second repositories, opened (or made) on first use.
    pub(super) async fn repository_named(&self, name: &str) -> Result<Arc<Repository>, Error> {
        if name.is_empty() {
            return self.repository();
        }
        let mut open = self.copy_repos.lock().await;
        if let Some(repo) = open.get(name) {
            return Ok(repo.clone());
        }
        let location = self.settings.copy_repositories.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.settings.copy_repositories.keys().map(String::as_str).collect();
            Error::invalid("repository", format!("no second repository {name:?} is configured (known: {known:?})"))
        })?;
        let repo = Arc::new(open_repository(location, self.settings.backup_passphrase.clone()).await?);
        open.insert(name.to_string(), repo.clone());
        Ok(repo)
    }

    /// The repository to restore `backup` from: its copy in `from`, or the backup repository.
    pub(super) async fn restore_source(
        &self,
        c: &mut db::Conn,
        backup: &Backup,
        from: Option<&str>,
    ) -> Result<Arc<Repository>, Error> {
        let Some(from) = from else { return self.repository() };
        let backup = self.with_copies(c, vec![backup.clone()]).await?.remove(0);
        if !backup.copies.iter().any(|r| r == from) {
            return Err(Error::conflict(format!("backup {} has no copy in {from}", backup.id)));
        }
        self.repository_named(from).await
    }

    /// Fills in each backup's copies.
    pub(super) async fn with_copies(&self, c: &mut db::Conn, mut backups: Vec<Backup>) -> Result<Vec<Backup>, Error> {
        // One backup's copies alone; a listing's all at once.
        let only = match backups.as_slice() {
            [one] => Some(one.id.clone()),
            _ => None,
        };
        let mut copies = db::copies(c, only.as_deref()).await?;
        for b in &mut backups {
            b.copies = copies.remove(&b.id).unwrap_or_default();
        }
        Ok(backups)
    }
}

impl Control {
    /// Copies backups to the second repository `to`, oldest first so each finds its parent's
    /// copy and sends only what changed: one backup, or every backup (of a volume or a VM's
    /// disks) that has no copy there yet. A job; each copy is recorded as it completes.
    pub async fn start_copy(
        self: &Arc<Self>,
        t: &Tenant,
        to: &str,
        backup: Option<&str>,
        volume: Option<&str>,
        vm: Option<&str>,
    ) -> Result<JobView, Error> {
        if to.is_empty() {
            return Err(Error::invalid("to", "name a second repository"));
        }
        let source = self.repository()?;
        let dest = self.repository_named(to).await?;
        let mut c = self.meta.conn().await?;
        let selected = match backup {
            Some(id) => {
                vec![db::find_backup(&mut c, &t.id, id).await?.ok_or_else(|| Error::not_found("backup", id))?]
            }
            None => {
                let filter = DiskFilter::resolve(&mut c, t, volume, vm).await?;
                db::list_backups(&mut c, Some(&t.id), filter.volume_id(), filter.vm_id()).await?
            }
        };
        let pending: Vec<Backup> = self
            .with_copies(&mut c, selected)
            .await?
            .into_iter()
            .filter(|b| !b.copies.iter().any(|r| r == to))
            .collect();
        let job = self.new_job(t, JobKind::Copy, backup.unwrap_or(""), "", 0);
        db::insert_job(&mut c, &job).await?;
        drop(c);
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        let to = to.to_string();
        tokio::spawn(async move {
            let (result, report) = match control.copy_all(&source, &dest, &to, pending, &progress).await {
                Ok(report) => (Ok(Vec::new()), report),
                Err((e, report)) => (Err(e), report),
            };
            let id = job.id.clone();
            if let Err(e) = control.finish_reporting(job, result, Some(report)).await {
                eprintln!("cairn: recording the end of copy job {id}: {e}");
            }
        });
        Ok(view)
    }

    /// The copy job's work; the report lists what was copied, also when a later copy failed.
    pub(super) async fn copy_all(
        &self,
        source: &Arc<Repository>,
        dest: &Arc<Repository>,
        to: &str,
        backups: Vec<Backup>,
        progress: &Arc<Progress>,
    ) -> Result<serde_json::Value, (String, serde_json::Value)> {
        let mut copied = Vec::new();
        let (mut fetched, mut added) = (0, 0);
        let report = |copied: &Vec<String>, fetched: u64, added: u64| serde_json::json!({"repository": to, "copied": copied, "chunks_fetched": fetched, "bytes_added": added});
        for backup in backups {
            let (source, dest, progress, record) =
                (source.clone(), dest.clone(), progress.clone(), backup.record.clone());
            let outcome = blocking(move || source.copy_backup(&record, &dest, Some(&progress.counters))).await;
            let stats = match outcome {
                Ok(Ok(stats)) => stats,
                Ok(Err(e)) => return Err((format!("copying {}: {e}", backup.id), report(&copied, fetched, added))),
                Err(e) => return Err((e.to_string(), report(&copied, fetched, added))),
            };
            let recorded = async {
                let mut c = self.meta.conn().await?;
                db::insert_copy(&mut c, &backup.id, to, &now()).await
            };
            if let Err(e) = recorded.await {
                return Err((format!("recording the copy of {}: {e}", backup.id), report(&copied, fetched, added)));
            }
            fetched += stats.chunks_fetched;
            added += stats.bytes_added;
            copied.push(backup.id);
        }
        Ok(report(&copied, fetched, added))
    }
}
