//! VMs: create (blank, from a template, from an image), start/stop, delete (R8).

use std::sync::Arc;

use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::{now, Error};

use super::*;

impl Control {
    /// Creates a VM; with an image, also the job that imports its root disk.
    pub async fn create_vm(self: &Arc<Self>, t: &Tenant, request: CreateVm) -> Result<(Vm, Option<JobView>), Error> {
        check_name("name", &request.name)?;
        let size = request.size.as_ref().map(|s| s.volume_bytes("size")).transpose()?;
        let sources =
            [request.size.is_some() && request.template.is_none(), request.template.is_some(), request.image.is_some()];
        if sources.iter().filter(|s| **s).count() != 1 || (request.image.is_some() && request.size.is_some()) {
            return Err(Error::invalid(
                "size",
                "give exactly one of size, template and image (size may go with template)",
            ));
        }
        let image = match &request.image {
            Some(image) => Some(self.inspect_image(t, image).await?),
            None => None,
        };
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Vm, &request.name).await?;
        let root_name = Self::free_name(&mut tx, t, Kind::Volume, &format!("{}-root", request.name)).await?;
        let template = match &request.template {
            Some(reference) => Some(self.template(&mut tx, t, reference).await?),
            None => None,
        };
        if template.as_ref().is_some_and(|tpl| tpl.state != ResourceState::Ready) {
            return Err(Error::conflict("the template is still being imported"));
        }
        let root_bytes = size.or(template.as_ref().map(|tpl| tpl.size)).or(image.as_ref().map(|i| i.2)).unwrap_or(0);
        self.check_quota(&mut tx, t, Holding { bytes: root_bytes, volumes: 1, ..Default::default() }).await?;
        let vm = Vm {
            id: new_id(Kind::Vm),
            tenant: t.id.clone(),
            name: request.name.clone(),
            state: VmState::Running,
            root_volume: new_id(Kind::Volume),
            data_volumes: Vec::new(),
            template: template.as_ref().map(|tpl| tpl.id.clone()),
            created_at: now(),
        };
        let mut root = Volume {
            id: vm.root_volume.clone(),
            ..Volume::new(&t.id, root_name, 0, Some(vm.id.clone()), DiskRole::Root, Source::Blank)
        };
        let mut job = None;
        if let Some(tpl) = &template {
            if size.is_some_and(|s| s < tpl.size) {
                return Err(Error::invalid("size", format!("size is smaller than the template ({} bytes)", tpl.size)));
            }
            let info = self.engine.clone_snapshot(self.template_snapshot(&tpl.id)?, &root.id, size)?;
            root.size = info.size;
            root.source = Source::Template { id: tpl.id.clone() };
        } else if let Some((path, format, image_size)) = image {
            root.size = image_size;
            root.state = ResourceState::Importing;
            root.source = Source::Image { path: path.clone() };
            self.engine.create_volume(&root.id, image_size)?;
            job = Some((self.new_job(t, JobKind::Import, &root.id, &path, image_size), format));
        } else {
            root.size = size.expect("checked above");
            self.engine.create_volume(&root.id, root.size)?;
        }
        db::insert_volume(&mut tx, &root).await?;
        db::insert_vm(&mut tx, &vm).await?;
        let job = match job {
            Some((job, format)) => {
                db::insert_job(&mut tx, &job).await?;
                tx.commit().await?;
                Some(self.start_import(job, format))
            }
            None => {
                tx.commit().await?;
                None
            }
        };
        Ok((vm, job))
    }

    pub async fn list_vms(&self, t: &Tenant) -> Result<Vec<Vm>, Error> {
        let mut c = self.meta.conn().await?;
        let mut vms = db::list_vms(&mut c, Some(&t.id)).await?;
        let volumes = db::list_volumes(&mut c, Some(&t.id), None).await?;
        for vm in &mut vms {
            vm.data_volumes = volumes
                .iter()
                .filter(|v| v.role == DiskRole::Data && v.vm.as_deref() == Some(vm.id.as_str()))
                .map(|v| v.id.clone())
                .collect();
        }
        Ok(vms)
    }

    pub async fn get_vm(&self, t: &Tenant, reference: &str) -> Result<Vm, Error> {
        self.vm(&mut *self.meta.conn().await?, t, reference).await
    }

    pub async fn set_vm_state(&self, t: &Tenant, reference: &str, state: VmState) -> Result<Vm, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut vm = self.vm(&mut tx, t, reference).await?;
        db::set_vm_state(&mut tx, &vm.id, state).await?;
        tx.commit().await?;
        vm.state = state;
        Ok(vm)
    }

    /// Deletes a VM and its root volume (and data volumes restored from its root-disk snapshots,
    /// which R7 keeps with it); other data volumes are detached and stay; snapshots stay (R8).
    pub async fn delete_vm(&self, t: &Tenant, reference: &str) -> Result<DeleteVmOutcome, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let vm = self.vm(&mut tx, t, reference).await?;
        if self.volume(&mut tx, t, &vm.root_volume).await?.state == ResourceState::Importing {
            return Err(Error::conflict("the VM's root disk is being imported; wait for the job"));
        }
        let (mut deleted, mut detached) = (Vec::new(), Vec::new());
        for mut volume in db::list_volumes(&mut tx, Some(&t.id), Some(&vm.id)).await? {
            if volume.from_root_disk {
                db::delete_volume(&mut tx, &volume.id).await?;
                db::delete_schedules_of(&mut tx, &volume.id).await?;
                deleted.push(volume.id);
            } else {
                volume.vm = None;
                db::update_volume(&mut tx, &volume).await?;
                detached.push(volume.id);
            }
        }
        db::delete_vm(&mut tx, &vm.id).await?;
        db::delete_schedules_of(&mut tx, &vm.id).await?;
        tx.commit().await?;
        for id in &deleted {
            self.remove_engine_volume(id)?;
        }
        Ok(DeleteVmOutcome { deleted: vm.id, deleted_volumes: deleted, detached_volumes: detached })
    }
}
