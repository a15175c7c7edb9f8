//! Templates (R6): frozen engine volumes that VMs clone.

use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::{now, Error};

use super::*;

impl Control {
    /// A template from a root-disk snapshot (R6): an engine volume cloned from it and frozen.
    pub async fn create_template(&self, t: &Tenant, name: &str, snapshot: &str) -> Result<TemplateView, Error> {
        check_name("name", name)?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Template, name).await?;
        let snapshot = self.snapshot(&mut tx, t, snapshot).await?;
        let size = self.snapshot_view(snapshot.clone())?.logical_bytes;
        self.check_quota(&mut tx, t, Holding { bytes: size, ..Default::default() }).await?;
        if snapshot.disk_role != DiskRole::Root {
            return Err(Error::conflict(format!(
                "snapshot {} is of a data disk; templates are made from root-disk snapshots (restore a data-disk \
                 snapshot to a volume instead)",
                snapshot.name
            )));
        }
        let template = Template {
            id: new_id(Kind::Template),
            tenant: t.id.clone(),
            name: name.into(),
            size: 0,
            state: ResourceState::Ready,
            source: Source::Snapshot { id: snapshot.id.clone() },
            created_at: now(),
        };
        let info = self.engine.clone_snapshot(self.engine_snapshot(&snapshot.id)?, &template.id, None)?;
        self.engine.snapshot(info.id, TEMPLATE_SNAPSHOT)?;
        let template = Template { size: info.size, ..template };
        db::insert_template(&mut tx, &template).await?;
        tx.commit().await?;
        Ok(self.template_view(template))
    }

    pub async fn list_templates(&self, t: &Tenant) -> Result<Vec<TemplateView>, Error> {
        let templates = db::list_templates(&mut *self.meta.conn().await?, Some(&t.id)).await?;
        Ok(templates.into_iter().map(|tpl| self.template_view(tpl)).collect())
    }

    pub async fn get_template(&self, t: &Tenant, reference: &str) -> Result<TemplateView, Error> {
        Ok(self.template_view(self.template(&mut *self.meta.conn().await?, t, reference).await?))
    }

    /// Deletes a template; VMs made from it keep the layers they share with it.
    pub async fn delete_template(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let template = self.template(&mut tx, t, reference).await?;
        if template.state != ResourceState::Ready {
            return Err(Error::conflict(format!("template {} is being imported", template.name)));
        }
        db::delete_template(&mut tx, &template.id).await?;
        tx.commit().await?;
        self.remove_engine_volume(&template.id)?;
        Ok(template.id)
    }
}
