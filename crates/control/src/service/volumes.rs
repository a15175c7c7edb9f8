//! Data volumes: create, attach, detach, grow, revert (R4), delete.

use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, Kind, SizeArg};
use crate::Error;

use super::*;

impl Control {
    pub async fn create_volume(
        &self,
        t: &Tenant,
        name: &str,
        size: &SizeArg,
        vm: Option<&str>,
    ) -> Result<VolumeView, Error> {
        check_name("name", name)?;
        let size = size.volume_bytes("size")?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        self.check_quota(&mut tx, t, Holding { bytes: size, volumes: 1, ..Default::default() }).await?;
        Self::name_free(&mut tx, t, Kind::Volume, name).await?;
        let vm = self.optional_vm(&mut tx, t, vm).await?.map(|vm| vm.id);
        let volume = Volume::new(&t.id, name.into(), size, vm, DiskRole::Data, Source::Blank);
        self.engine.create_volume(&volume.id, size)?;
        db::insert_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn list_volumes(&self, t: &Tenant) -> Result<Vec<VolumeView>, Error> {
        let volumes = db::list_volumes(&mut *self.meta.conn().await?, Some(&t.id), None).await?;
        Ok(volumes.into_iter().map(|v| self.volume_view(v)).collect())
    }

    pub async fn get_volume(&self, t: &Tenant, reference: &str) -> Result<VolumeView, Error> {
        Ok(self.volume_view(self.volume(&mut *self.meta.conn().await?, t, reference).await?))
    }

    pub async fn attach_volume(&self, t: &Tenant, reference: &str, vm: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        let vm = self.vm(&mut tx, t, vm).await?;
        if volume.from_root_disk {
            return Err(Error::conflict(format!(
                "volume {} holds a VM's root disk and stays with that VM (R7)",
                volume.name
            )));
        }
        if let Some(current) = &volume.vm {
            return Err(Error::conflict(format!("volume {} is attached to {current}; detach it first", volume.name)));
        }
        volume.vm = Some(vm.id);
        db::update_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn detach_volume(&self, t: &Tenant, reference: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        if volume.from_root_disk {
            return Err(Error::conflict(format!(
                "volume {} holds a VM's root disk; it can not be detached or become a standalone volume (R7): \
                 delete it, or the VM",
                volume.name
            )));
        }
        if volume.vm.is_none() {
            return Err(Error::conflict(format!("volume {} is not attached", volume.name)));
        }
        volume.vm = None;
        db::update_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn grow_volume(&self, t: &Tenant, reference: &str, size: &SizeArg) -> Result<VolumeView, Error> {
        let size = size.volume_bytes("size")?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        if size < volume.size {
            return Err(Error::conflict(format!(
                "volume {} is {} bytes; volumes only grow (asked for {size})",
                volume.name, volume.size
            )));
        }
        if volume.state != ResourceState::Ready {
            return Err(Error::conflict(format!("volume {} is being imported", volume.name)));
        }
        if size > volume.size {
            self.check_quota(&mut tx, t, Holding { bytes: size - volume.size, ..Default::default() }).await?;
            self.engine.grow(self.engine_volume(&volume.id)?, size)?;
            volume.size = size;
            db::update_volume(&mut tx, &volume).await?;
            tx.commit().await?;
        }
        Ok(self.volume_view(volume))
    }

    /// Makes a volume's content that of one of its snapshots (R4); its VM must be stopped, as a
    /// running guest would see its disk change under it.
    pub async fn revert_volume(&self, t: &Tenant, reference: &str, snapshot: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut c = self.meta.conn().await?;
        let volume = self.volume(&mut c, t, reference).await?;
        let snapshot = self.snapshot(&mut c, t, snapshot).await?;
        if let Some(vm) = &volume.vm {
            let vm = self.vm(&mut c, t, vm).await?;
            if vm.state == VmState::Running {
                return Err(Error::conflict(format!("VM {} is running; stop it before reverting its disk", vm.name)));
            }
        }
        let own = snapshot.volume == volume.id || volume.source == Source::Snapshot { id: snapshot.id.clone() };
        if !own {
            return Err(Error::conflict(format!(
                "snapshot {} is not of volume {}; restore it to a new volume instead",
                snapshot.name, volume.name
            )));
        }
        self.engine.revert(self.engine_volume(&volume.id)?, self.engine_snapshot(&snapshot.id)?)?;
        Ok(self.volume_view(volume))
    }

    pub async fn delete_volume(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let volume = self.volume(&mut tx, t, reference).await?;
        match (&volume.vm, volume.role) {
            (Some(vm), DiskRole::Root) => {
                return Err(Error::conflict(format!("volume {} is the root disk of {vm}; delete the VM", volume.name)))
            }
            // A copy of a root disk can not be detached (R7), so it may be deleted attached.
            (Some(vm), DiskRole::Data) if !volume.from_root_disk => {
                return Err(Error::conflict(format!("volume {} is attached to {vm}; detach it first", volume.name)))
            }
            _ => {}
        }
        if volume.state == ResourceState::Importing {
            return Err(Error::conflict(format!("volume {} is being imported", volume.name)));
        }
        db::delete_volume(&mut tx, &volume.id).await?;
        db::delete_schedules_of(&mut tx, &volume.id).await?;
        tx.commit().await?;
        self.remove_engine_volume(&volume.id)?;
        Ok(volume.id)
    }
}
