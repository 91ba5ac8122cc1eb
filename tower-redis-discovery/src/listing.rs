//! A listing of the registry for a gateway's `/services` endpoint.

use serde::Serialize;

use crate::instance::{Instance, Status};
use crate::registry::{Registry, RegistryError};

/// One service and its instances (each one in HazelJS's JSON shape).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceEntry {
    /// The service's name.
    pub name: String,
    /// How many of its instances are `UP`.
    pub up: usize,
    /// Every instance that has not expired, whatever its status.
    pub instances: Vec<Instance>,
}

/// Every service in the registry, sorted by name: serialize it as the body of `GET /services`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceListing {
    /// The services.
    pub services: Vec<ServiceEntry>,
}

/// Reads every service and its instances.
///
/// # Errors
///
/// [`RegistryError`] when the registry fails.
pub async fn list_services<R: Registry>(registry: &R) -> Result<ServiceListing, RegistryError> {
    let mut services = Vec::new();
    for name in registry.services().await? {
        let instances = registry.instances(&name).await?;
        if instances.is_empty() {
            continue; // a set whose members all expired
        }
        let up = instances
            .iter()
            .filter(|instance| instance.status == Status::Up)
            .count();
        services.push(ServiceEntry {
            name,
            up,
            instances,
        });
    }
    Ok(ServiceListing { services })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::MemoryRegistry;

    #[tokio::test]
    async fn the_listing_groups_instances_by_service_and_counts_the_up_ones() {
        let registry = MemoryRegistry::new(Duration::from_secs(60));
        let mut a = Instance::new("users", "10.0.0.1", 1);
        a.status = Status::Up;
        let b = Instance::new("users", "10.0.0.2", 2);
        let c = Instance::new("orders", "10.0.0.3", 3);
        for instance in [&a, &b, &c] {
            registry.register(instance).await.unwrap();
        }
        let listing = list_services(&registry).await.unwrap();
        let summary: Vec<(String, usize, usize)> = listing
            .services
            .iter()
            .map(|entry| (entry.name.clone(), entry.up, entry.instances.len()))
            .collect();
        assert_eq!(
            summary,
            vec![("orders".to_owned(), 0, 1), ("users".to_owned(), 1, 2)]
        );
        let json = serde_json::to_value(&listing).unwrap();
        assert_eq!(
            json["services"][1]["instances"][0]["healthCheckPath"],
            "/health"
        );
    }
}
