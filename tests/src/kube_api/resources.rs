//! The kinds the fake serves, the API server's `Status` errors, and admission: decoding through
//! the k8s-openapi types (which drops unknown fields, as the real server does by default), the
//! defaults the real server fills in, and the validation rules a Deployment rewrite can trip.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy, ReplicaSet, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Event, Namespace, PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, Probe,
    Secret, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// One kind of object the fake stores.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

pub const DEPLOYMENTS: &Resource = &Resource::new("apps", "v1", "deployments", "Deployment", true);
pub const REPLICASETS: &Resource = &Resource::new("apps", "v1", "replicasets", "ReplicaSet", true);
pub const PODS: &Resource = &Resource::new("", "v1", "pods", "Pod", true);
pub const SECRETS: &Resource = &Resource::new("", "v1", "secrets", "Secret", true);
pub const CONFIGMAPS: &Resource = &Resource::new("", "v1", "configmaps", "ConfigMap", true);
pub const PVCS: &Resource = &Resource::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true);
pub const EVENTS: &Resource = &Resource::new("", "v1", "events", "Event", true);
pub const NAMESPACES: &Resource = &Resource::new("", "v1", "namespaces", "Namespace", false);
pub const HPAS: &Resource =
    &Resource::new("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", true);

pub const ALL: &[&Resource] =
    &[DEPLOYMENTS, REPLICASETS, PODS, SECRETS, CONFIGMAPS, PVCS, EVENTS, NAMESPACES, HPAS];

impl Resource {
    const fn new(
        group: &'static str,
        version: &'static str,
        plural: &'static str,
        kind: &'static str,
        namespaced: bool,
    ) -> Resource {
        Resource { group, version, plural, kind, namespaced }
    }

    pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        ALL.iter().copied().find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, or `pods` for the core group: how messages name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Deployment.apps`, or `Pod`: how validation messages name the kind.
    fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Whether `metadata.generation` counts changes to `spec`.
    pub fn has_generation(&self) -> bool {
        self == DEPLOYMENTS || self == REPLICASETS
    }

    /// Whether a write through the main resource keeps the stored `status` (it belongs to the
    /// `status` subresource).
    pub fn has_status(&self) -> bool {
        !matches!(self.plural, "secrets" | "configmaps" | "events")
    }
}

/// An error as the API server reports it: an HTTP code and a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn details(res: &Resource, name: &str) -> Value {
        let mut details = json!({ "name": name, "kind": res.plural });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        details
    }

    pub fn not_found(res: &Resource, name: &str) -> ApiError {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", res.qualified()),
            details: Some(ApiError::details(res, name)),
        }
    }

    pub fn already_exists(res: &Resource, name: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", res.qualified()),
            details: Some(ApiError::details(res, name)),
        }
    }

    pub fn conflict(res: &Resource, name: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please \
                 apply your changes to the latest version and try again",
                res.qualified()
            ),
            details: Some(ApiError::details(res, name)),
        }
    }

    /// What RBAC answers; `resource` may name a subresource (`pods/exec`).
    pub fn forbidden(
        res: &Resource,
        resource: &str,
        verb: &str,
        user: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> ApiError {
        let subject = match name {
            Some(name) => format!("{} \"{name}\"", res.qualified()),
            None => res.qualified(),
        };
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_owned(),
        };
        ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API \
                 group \"{}\"{scope}",
                res.group
            ),
            details: Some(ApiError::details(res, name.unwrap_or(""))),
        }
    }

    pub fn invalid(res: &Resource, name: &str, causes: Vec<Cause>) -> ApiError {
        let listed: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let summary = match listed.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let mut details = json!({ "name": name, "kind": res.kind, "causes": causes.iter().map(|c| json!({
            "reason": c.reason, "message": c.message, "field": c.field,
        })).collect::<Vec<_>>() });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {summary}", res.group_kind()),
            details: Some(details),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { code: 400, reason: "BadRequest", message: message.into(), details: None }
    }

    pub fn unauthorized() -> ApiError {
        ApiError { code: 401, reason: "Unauthorized", message: "Unauthorized".into(), details: None }
    }

    pub fn method_not_allowed(what: &str) -> ApiError {
        ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!("the server does not allow this method on the requested resource ({what})"),
            details: None,
        }
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format ({content_type}) - the fake API server \
                 accepts application/json-patch+json and application/merge-patch+json"
            ),
            details: None,
        }
    }

    pub fn gone(message: String) -> ApiError {
        ApiError { code: 410, reason: "Expired", message, details: None }
    }

    pub fn page_not_found() -> ApiError {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: None,
        }
    }

    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// One field-level validation failure.
pub struct Cause {
    reason: &'static str,
    message: String,
    field: String,
}

impl Cause {
    fn required(field: impl Into<String>) -> Cause {
        Cause { reason: "FieldValueRequired", message: "Required value".into(), field: field.into() }
    }

    fn invalid(field: impl Into<String>, value: &str, why: &str) -> Cause {
        Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{value}\": {why}"),
            field: field.into(),
        }
    }

    fn forbidden(field: impl Into<String>, why: &str) -> Cause {
        Cause { reason: "FieldValueForbidden", message: format!("Forbidden: {why}"), field: field.into() }
    }

    fn not_found(field: impl Into<String>, value: &str) -> Cause {
        Cause {
            reason: "FieldValueNotFound",
            message: format!("Not found: \"{value}\""),
            field: field.into(),
        }
    }

    fn duplicate(field: impl Into<String>, value: &str) -> Cause {
        Cause {
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: \"{value}\""),
            field: field.into(),
        }
    }
}

/// Checks and completes an object written through the API: `kind`/`apiVersion` must match the
/// URL, unknown fields are dropped, defaults are filled in and the object is validated. `old` is
/// the stored object on an update.
pub fn admit(res: &'static Resource, mut obj: Value, old: Option<&Value>) -> Result<Value, ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!("the body of a {} must be a JSON object", res.kind)));
    };
    for (field, expected) in [("kind", res.kind.to_owned()), ("apiVersion", res.api_version())] {
        match map.get(field).and_then(Value::as_str) {
            Some(given) if given != expected => {
                return Err(ApiError::bad_request(format!(
                    "the {field} \"{given}\" of the body does not match the URL's \"{expected}\""
                )))
            }
            _ => {
                map.insert(field.to_owned(), json!(expected));
            }
        }
    }
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned();
    let admitted = match res.plural {
        "deployments" => {
            let mut d: Deployment = decode(res, obj)?;
            default_deployment(&mut d);
            validate_deployment(&d, old.map(|o| decode::<Deployment>(res, o.clone())).transpose()?.as_ref())
                .map_err(|causes| ApiError::invalid(res, &name, causes))?;
            encode(&d)
        }
        "pods" => {
            let mut pod: Pod = decode(res, obj)?;
            if let Some(spec) = pod.spec.as_mut() {
                default_pod_spec(spec);
            }
            let causes = match &pod.spec {
                Some(spec) => validate_pod_spec(spec, "spec"),
                None => vec![Cause::required("spec")],
            };
            if !causes.is_empty() {
                return Err(ApiError::invalid(res, &name, causes));
            }
            encode(&pod)
        }
        "secrets" => {
            let mut secret: Secret = decode(res, obj)?;
            // The API server folds the write-only stringData into data.
            if let Some(strings) = secret.string_data.take() {
                let data = secret.data.get_or_insert_with(Default::default);
                for (key, value) in strings {
                    data.insert(key, ByteString(value.into_bytes()));
                }
            }
            encode(&secret)
        }
        "persistentvolumeclaims" => {
            let mut pvc: PersistentVolumeClaim = decode(res, obj)?;
            let spec = pvc.spec.get_or_insert_with(Default::default);
            // What the DefaultStorageClass admission plugin does on create.
            if old.is_none() && spec.storage_class_name.is_none() {
                spec.storage_class_name = Some(super::DEFAULT_STORAGE_CLASS.to_owned());
            }
            spec.volume_mode.get_or_insert_with(|| "Filesystem".to_owned());
            encode(&pvc)
        }
        "replicasets" => encode(&decode::<ReplicaSet>(res, obj)?),
        "configmaps" => encode(&decode::<ConfigMap>(res, obj)?),
        "events" => encode(&decode::<Event>(res, obj)?),
        "namespaces" => encode(&decode::<Namespace>(res, obj)?),
        _ => encode(&decode::<HorizontalPodAutoscaler>(res, obj)?),
    };
    validate_name(res, &admitted)?;
    Ok(admitted)
}

fn decode<T: DeserializeOwned>(res: &Resource, obj: Value) -> Result<T, ApiError> {
    serde_json::from_value(obj).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            res.kind, res.version, res.kind
        ))
    })
}

fn encode<T: Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).expect("k8s-openapi types serialize to JSON")
}

fn validate_name(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let generate = obj.pointer("/metadata/generateName").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() && generate.is_empty() {
        return Err(ApiError::invalid(res, "", vec![Cause::required("metadata.name")]));
    }
    if !name.is_empty() && !is_dns_subdomain(name) {
        return Err(ApiError::invalid(
            res,
            name,
            vec![Cause::invalid(
                "metadata.name",
                name,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
                 or '.', and must start and end with an alphanumeric character",
            )],
        ));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The defaults the real API server writes into a Deployment; enough of them that an object read
/// back differs from the one written the way it does on a real cluster.
fn default_deployment(d: &mut Deployment) {
    let spec = &mut d.spec;
    spec.replicas.get_or_insert(1);
    spec.revision_history_limit.get_or_insert(10);
    spec.progress_deadline_seconds.get_or_insert(600);
    let strategy = spec.strategy.get_or_insert_with(DeploymentStrategy::default);
    let kind = strategy.type_.get_or_insert_with(|| "RollingUpdate".to_owned());
    if kind == "RollingUpdate" {
        let rolling = strategy.rolling_update.get_or_insert_with(RollingUpdateDeployment::default);
        rolling.max_surge.get_or_insert_with(|| IntOrString::String("25%".into()));
        rolling.max_unavailable.get_or_insert_with(|| IntOrString::String("25%".into()));
    }
    default_template(&mut spec.template);
}

fn default_template(template: &mut PodTemplateSpec) {
    if let Some(spec) = template.spec.as_mut() {
        default_pod_spec(spec);
    }
}

fn default_pod_spec(spec: &mut PodSpec) {
    spec.restart_policy.get_or_insert_with(|| "Always".to_owned());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".to_owned());
    spec.scheduler_name.get_or_insert_with(|| "default-scheduler".to_owned());
    spec.security_context.get_or_insert_with(Default::default);
    for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        default_container(container);
    }
    for volume in spec.volumes.iter_mut().flatten() {
        default_volume(volume);
    }
}

fn default_container(c: &mut Container) {
    c.termination_message_path.get_or_insert_with(|| "/dev/termination-log".to_owned());
    c.termination_message_policy.get_or_insert_with(|| "File".to_owned());
    if let Some(image) = &c.image {
        let last = image.rsplit('/').next().unwrap_or(image);
        let tag = last.split_once('@').map_or(last, |(name, _)| name).split_once(':').map(|(_, tag)| tag);
        let policy =
            if tag.is_none_or(|t| t == "latest") && !last.contains('@') { "Always" } else { "IfNotPresent" };
        c.image_pull_policy.get_or_insert_with(|| policy.to_owned());
    }
    for port in c.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".to_owned());
    }
    for probe in [&mut c.liveness_probe, &mut c.readiness_probe, &mut c.startup_probe].into_iter().flatten() {
        default_probe(probe);
    }
}

fn default_probe(p: &mut Probe) {
    p.timeout_seconds.get_or_insert(1);
    p.period_seconds.get_or_insert(10);
    p.success_threshold.get_or_insert(1);
    p.failure_threshold.get_or_insert(3);
}

fn default_volume(v: &mut Volume) {
    if let Some(cm) = v.config_map.as_mut() {
        cm.default_mode.get_or_insert(0o644);
    }
    if let Some(secret) = v.secret.as_mut() {
        secret.default_mode.get_or_insert(0o644);
    }
}

fn validate_deployment(d: &Deployment, old: Option<&Deployment>) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let spec = &d.spec;
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    if selector.is_empty() && spec.selector.match_expressions.as_ref().is_none_or(Vec::is_empty) {
        causes.push(Cause::required("spec.selector"));
    }
    let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    if selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        causes.push(Cause::invalid(
            "spec.template.metadata.labels",
            &format!("{labels:?}"),
            "`selector` does not match template `labels`",
        ));
    }
    if let Some(old_spec) = old.map(|o| &o.spec) {
        if old_spec.selector != spec.selector {
            causes.push(Cause::invalid(
                "spec.selector",
                &format!("{:?}", spec.selector),
                "field is immutable",
            ));
        }
    }
    if spec.replicas.is_some_and(|r| r < 0) {
        causes.push(Cause::invalid(
            "spec.replicas",
            &spec.replicas.unwrap_or_default().to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let strategy = spec.strategy.as_ref().expect("defaulting made a strategy");
    match strategy.type_.as_deref() {
        Some("Recreate") if strategy.rolling_update.is_some() => causes.push(Cause::forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        )),
        Some("Recreate" | "RollingUpdate") => {}
        other => causes.push(Cause::invalid(
            "spec.strategy.type",
            other.unwrap_or(""),
            "supported values: \"Recreate\", \"RollingUpdate\"",
        )),
    }
    match &spec.template.spec {
        Some(pod) => causes.extend(validate_pod_spec(pod, "spec.template.spec")),
        None => causes.push(Cause::required("spec.template.spec")),
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

fn validate_pod_spec(spec: &PodSpec, at: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut volumes = BTreeSet::new();
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        if !volumes.insert(volume.name.as_str()) {
            causes.push(Cause::duplicate(format!("{at}.volumes[{i}].name"), &volume.name));
        }
    }
    if spec.containers.is_empty() {
        causes.push(Cause::required(format!("{at}.containers")));
    }
    let mut names = BTreeSet::new();
    let lists = [
        ("initContainers", spec.init_containers.as_deref().unwrap_or_default()),
        ("containers", &spec.containers),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let field = format!("{at}.{list}[{i}]");
            if !is_dns_label(&c.name) {
                causes.push(Cause::invalid(format!("{field}.name"), &c.name, "a lowercase RFC 1123 label"));
            } else if !names.insert(c.name.as_str()) {
                causes.push(Cause::duplicate(format!("{field}.name"), &c.name));
            }
            if c.image.as_deref().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("{field}.image")));
            }
            for (j, mount) in c.volume_mounts.iter().flatten().enumerate() {
                if !volumes.contains(mount.name.as_str()) {
                    causes.push(Cause::not_found(format!("{field}.volumeMounts[{j}].name"), &mount.name));
                }
                if mount.mount_path.is_empty() {
                    causes.push(Cause::required(format!("{field}.volumeMounts[{j}].mountPath")));
                }
            }
        }
    }
    causes
}
