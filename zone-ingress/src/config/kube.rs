//! The Kubernetes form of Kuma resources, as `kubectl get -o yaml` prints them
//! (`docs/operations.md#input-forms`): `apiVersion: kuma.io/v1alpha1`, `kind`, `metadata`,
//! `mesh` (mesh-scoped kinds) and `spec`, which holds what the Universal form has at the top level.
//! A namespaced object's Kuma name is `name.namespace`, as the control plane names it.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::check::{Checker, Need, Where, child_path, describe, get};

/// The API group and version of Kuma's resources.
pub(crate) const API_VERSION: &str = "kuma.io/v1alpha1";

/// The label that names a resource's mesh on Kubernetes.
pub(crate) const MESH_LABEL: &str = "kuma.io/mesh";

/// Whether `map` is in Kubernetes form: no `type`, but `kind` or `apiVersion`.
pub(crate) fn is_kube(map: &Mapping) -> bool {
    get(map, "type").is_none() && (get(map, "kind").is_some() || get(map, "apiVersion").is_some())
}

/// `kind`, when it is a string; an error otherwise.
pub(crate) fn kind<'m>(ck: &mut Checker<'_>, map: &'m Mapping, base: &str) -> Option<&'m str> {
    let path = child_path(base, "kind");
    match get(map, "kind") {
        Some(Value::String(kind)) => Some(kind),
        None => {
            ck.error(&path, Where::Parent(base), "is required beside `apiVersion`");
            None
        }
        Some(other) => {
            ck.error(&path, Where::Value(&path), format!("must be a string, got {}", describe(other)));
            None
        }
    }
}

/// Whether `apiVersion` is Kuma's (or absent); otherwise what is wrong with it.
pub(crate) fn api_version(map: &Mapping) -> Result<(), String> {
    match get(map, "apiVersion") {
        None => Ok(()),
        Some(Value::String(v)) if v == API_VERSION => Ok(()),
        Some(other) => Err(format!("must be `{API_VERSION}`, got {}", describe(other))),
    }
}

/// What `metadata` says about a resource.
pub(crate) struct Meta {
    /// Kuma's name: `metadata.name`, with `.namespace` when `metadata.namespace` is set.
    pub(crate) name: Option<String>,
    /// `metadata.labels` (string values only).
    pub(crate) labels: BTreeMap<String, String>,
    /// `metadata.creationTimestamp`.
    pub(crate) creation_time: Option<String>,
}

/// The path of a Kubernetes object's name, where diagnostics about the name point.
pub(crate) fn name_path(base: &str) -> String {
    child_path(&child_path(base, "metadata"), "name")
}

/// `metadata`; a missing or malformed name is an error.
pub(crate) fn metadata(ck: &mut Checker<'_>, map: &Mapping, base: &str) -> Meta {
    let mut meta = Meta { name: None, labels: BTreeMap::new(), creation_time: None };
    let path = child_path(base, "metadata");
    let Some(metadata) = ck.mapping(map, base, "metadata", Need::Required).ok() else {
        return meta;
    };
    let name = ck.string(metadata, &path, "name", Need::Required).ok();
    let namespace = ck.string(metadata, &path, "namespace", Need::Optional).ok();
    meta.name = name.map(|name| match namespace {
        Some(namespace) => format!("{name}.{namespace}"),
        None => name,
    });
    meta.labels = string_map(get(metadata, "labels"));
    meta.creation_time = get(metadata, "creationTimestamp").and_then(Value::as_str).map(str::to_owned);
    meta
}

/// The string entries of a mapping (labels); anything else is left out.
pub(crate) fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    match value {
        Some(Value::Mapping(map)) => {
            map.iter().filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned()))).collect()
        }
        _ => BTreeMap::new(),
    }
}
