//! Tenants and their tokens.

use crate::db;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::{now, Error};

use super::*;

impl Control {
    pub async fn authenticate(&self, token: &str) -> Result<Tenant, Error> {
        let mut c = self.meta.conn().await?;
        db::tenant_by_token(&mut c, &token_hash(token)).await?.ok_or(Error::Unauthorized)
    }

    pub(super) fn require_admin(tenant: &Tenant) -> Result<(), Error> {
        if tenant.admin {
            Ok(())
        } else {
            Err(Error::Forbidden("only an administrator may manage tenants".into()))
        }
    }

    /// Creates a tenant and its first token, returned once.
    pub async fn create_tenant(&self, caller: &Tenant, name: &str) -> Result<(Tenant, String), Error> {
        Self::require_admin(caller)?;
        check_name("name", name)?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        if db::tenant_by_name(&mut tx, name).await?.is_some() {
            return Err(Error::conflict(format!("a tenant named {name:?} exists")));
        }
        let tenant = Tenant { id: new_id(Kind::Tenant), name: name.into(), admin: false, created_at: now() };
        let token = new_token();
        db::insert_tenant(&mut tx, &tenant).await?;
        db::insert_token(&mut tx, &token_hash(&token), &tenant.id).await?;
        tx.commit().await?;
        Ok((tenant, token))
    }

    pub async fn list_tenants(&self, caller: &Tenant) -> Result<Vec<Tenant>, Error> {
        Self::require_admin(caller)?;
        db::list_tenants(&mut *self.meta.conn().await?).await
    }
}
