//! The object store: one global resourceVersion counter (as etcd's revision), objects as JSON,
//! a bounded log of changes that watches replay, and label and field selectors.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::resources::{ApiError, Resource, EVENTS, NAMESPACES, PODS};

/// How many changes a watch can resume from; an older resourceVersion gets `410 Expired`.
const LOG_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    plural: &'static str,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as a watch replays it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub res: &'static Resource,
    pub kind: ChangeKind,
    pub old: Option<Value>,
    pub new: Value,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Change>,
    /// Bumped to the latest resourceVersion on every write; watches and the controller wait on it.
    changed: watch::Sender<u64>,
    /// One sender per pod uid that has open exec or port-forward streams; dropping it ends them.
    streams: HashMap<String, watch::Sender<()>>,
}

impl Store {
    pub fn new() -> Store {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            changed: watch::Sender::new(1),
            streams: HashMap::new(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes the controller and watches without a write (a hook changed what they act on).
    pub fn touch(&self) {
        self.changed.send_replace(self.rv);
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(res: &'static Resource, namespace: &str, name: &str) -> Key {
        Key { plural: res.plural, namespace: namespace.to_owned(), name: name.to_owned() }
    }

    pub fn get(&self, res: &'static Resource, namespace: &str, name: &str) -> Result<&Value, ApiError> {
        self.objects.get(&Store::key(res, namespace, name)).ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn find(&self, res: &'static Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&Store::key(res, namespace, name))
    }

    /// The objects of one kind, in one namespace or all, that match `filter`.
    pub fn list(&self, res: &'static Resource, namespace: Option<&str>, filter: &Selectors) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, v)| {
                k.plural == res.plural && namespace.is_none_or(|ns| k.namespace == ns) && filter.matches(v)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Stores a new object, filling in the metadata the server owns.
    pub fn create(
        &mut self,
        res: &'static Resource,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if res.namespaced && self.find(NAMESPACES, "", namespace).is_none() {
            return Err(ApiError::not_found(NAMESPACES, namespace));
        }
        let meta = metadata_mut(&mut obj);
        let mut name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
        if name.is_empty() {
            let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or("");
            name = format!("{prefix}{}", random_suffix());
            meta.insert("name".into(), json!(name));
        }
        if self.find(res, namespace, &name).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        if res.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        for owned in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
            meta.remove(owned);
        }
        if res.has_generation() {
            meta.insert("generation".into(), json!(1));
        }
        if res.has_status() {
            if let Some(map) = obj.as_object_mut() {
                map.remove("status");
            }
        }
        if res == PODS {
            obj["status"] = json!({ "phase": "Pending" });
        }
        Ok(self.commit(res, namespace, &name, None, obj))
    }

    /// Replaces an object through the API: a `metadata.resourceVersion` in `obj` must match the
    /// stored one, the server-owned metadata and the status are kept.
    pub fn update(
        &mut self,
        res: &'static Resource,
        namespace: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let old = self.get(res, namespace, name)?.clone();
        let given_rv = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_owned);
        if given_rv.is_some_and(|rv| {
            Some(rv.as_str()) != old.pointer("/metadata/resourceVersion").and_then(Value::as_str)
        }) {
            return Err(ApiError::conflict(res, name));
        }
        let given_uid = obj.pointer("/metadata/uid").and_then(Value::as_str).map(str::to_owned);
        if given_uid
            .is_some_and(|uid| Some(uid.as_str()) != old.pointer("/metadata/uid").and_then(Value::as_str))
        {
            return Err(ApiError::conflict(res, name));
        }
        let old_meta = old.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default();
        let meta = metadata_mut(&mut obj);
        for owned in
            ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"]
        {
            match old_meta.get(owned) {
                Some(v) => meta.insert(owned.into(), v.clone()),
                None => meta.remove(owned),
            };
        }
        if res.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        }
        if res.has_generation() && old.get("spec") != obj.get("spec") {
            let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
            metadata_mut(&mut obj).insert("generation".into(), json!(generation + 1));
        }
        if res.has_status() {
            if let Some(map) = obj.as_object_mut() {
                match old.get("status") {
                    Some(status) => map.insert("status".into(), status.clone()),
                    None => map.remove("status"),
                };
            }
        }
        Ok(self.commit(res, namespace, name, Some(old), obj))
    }

    /// Writes an object the server itself changed (status, controller metadata); no-op when
    /// nothing changed. Returns whether it wrote.
    pub fn put(&mut self, res: &'static Resource, namespace: &str, name: &str, mut obj: Value) -> bool {
        let Some(old) = self.find(res, namespace, name).cloned() else { return false };
        metadata_mut(&mut obj).insert(
            "resourceVersion".into(),
            old.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
        );
        if old == obj {
            return false;
        }
        self.commit(res, namespace, name, Some(old), obj);
        true
    }

    /// Removes an object at once (no graceful deletion; see [`Store::terminate_pod`] for pods).
    pub fn delete(&mut self, res: &'static Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let mut obj = self
            .objects
            .remove(&Store::key(res, namespace, name))
            .ok_or_else(|| ApiError::not_found(res, name))?;
        if res == PODS {
            self.cut_streams(&obj);
        }
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.log_change(Change { rv: self.rv, res, kind: ChangeKind::Deleted, old: None, new: obj.clone() });
        Ok(obj)
    }

    /// Starts a pod's graceful deletion: it shows a deletionTimestamp until the controller
    /// removes it, and its exec and port-forward streams end now.
    pub fn terminate_pod(&mut self, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let mut pod = self.get(PODS, namespace, name)?.clone();
        self.cut_streams(&pod);
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(pod);
        }
        let grace = pod.pointer("/spec/terminationGracePeriodSeconds").cloned().unwrap_or(json!(30));
        let meta = metadata_mut(&mut pod);
        meta.insert("deletionTimestamp".into(), json!(now()));
        meta.insert("deletionGracePeriodSeconds".into(), grace);
        let old = self.find(PODS, namespace, name).cloned();
        Ok(self.commit(PODS, namespace, name, old, pod))
    }

    /// A receiver that sees its sender dropped when the pod is deleted (or its streams cut).
    pub fn pod_streams(&mut self, uid: &str) -> watch::Receiver<()> {
        self.streams.entry(uid.to_owned()).or_insert_with(|| watch::Sender::new(())).subscribe()
    }

    pub fn cut_streams(&mut self, pod: &Value) {
        if let Some(uid) = pod.pointer("/metadata/uid").and_then(Value::as_str) {
            self.streams.remove(uid);
        }
    }

    pub fn cut_all_streams(&mut self) {
        self.streams.clear();
    }

    /// Records a core/v1 Event about `about`, as a kubelet or controller would.
    pub fn record_event(&mut self, about: &Value, kind: &str, reason: &str, message: &str, component: &str) {
        let namespace = about.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
        let name = about.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        let at = now();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": { "name": format!("{name}.{:016x}", random_u64()) },
            "involvedObject": {
                "apiVersion": about.get("apiVersion"),
                "kind": about.get("kind"),
                "name": name,
                "namespace": namespace,
                "uid": about.pointer("/metadata/uid"),
                "resourceVersion": about.pointer("/metadata/resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": { "component": component },
            "reportingComponent": component,
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
        });
        // The event's own namespace exists: the object it is about lives there.
        let _ = self.create(EVENTS, namespace, event);
    }

    fn commit(
        &mut self,
        res: &'static Resource,
        namespace: &str,
        name: &str,
        old: Option<Value>,
        mut obj: Value,
    ) -> Value {
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(Store::key(res, namespace, name), obj.clone());
        let kind = if old.is_some() { ChangeKind::Modified } else { ChangeKind::Added };
        self.log_change(Change { rv: self.rv, res, kind, old, new: obj.clone() });
        obj
    }

    fn log_change(&mut self, change: Change) {
        if self.log.len() == LOG_LIMIT {
            self.log.pop_front();
        }
        self.log.push_back(change);
        self.changed.send_replace(self.rv);
    }

    /// The changes after resourceVersion `since`, or `410 Expired` when the log no longer
    /// reaches back that far.
    pub fn changes_since(&self, since: u64) -> Result<impl Iterator<Item = &Change>, ApiError> {
        let oldest = self.log.front().map_or(self.rv, |c| c.rv - 1);
        if since < oldest {
            return Err(ApiError::gone(format!("too old resource version: {since} ({oldest})")));
        }
        Ok(self.log.iter().filter(move |c| c.rv > since))
    }
}

fn metadata_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata was just made an object")
}

/// Kubernetes' `Time`: RFC 3339 in whole seconds, UTC.
pub fn now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Timestamp::from_second(secs as i64).map_or_else(|_| "1970-01-01T00:00:00Z".to_owned(), |t| t.to_string())
}

/// Randomness for names and uids; `RandomState` is seeded per instance, which is all a fake needs.
pub fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// The alphabet Kubernetes uses for generated name suffixes (no vowels, no look-alikes).
const SAFE_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub fn random_suffix() -> String {
    safe_encode(random_u64(), 5)
}

pub fn safe_encode(mut n: u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            let c = SAFE_CHARS[(n % SAFE_CHARS.len() as u64) as usize] as char;
            n /= SAFE_CHARS.len() as u64;
            c
        })
        .collect()
}

/// `labelSelector` and `fieldSelector` of a list or watch.
#[derive(Debug, Default, Clone)]
pub struct Selectors {
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum LabelRequirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selectors, ApiError> {
        let mut selectors = Selectors::default();
        for term in split_terms(labels.unwrap_or("")) {
            selectors.labels.push(parse_label_term(&term)?);
        }
        for term in fields.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid field selector: '{term}'")));
            };
            selectors.fields.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(selectors)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|req| match req {
            LabelRequirement::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelRequirement::NotIn(k, vs) => label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        labels_match
            && self.fields.iter().all(|(path, equal, value)| {
                let pointer = format!("/{}", path.replace('.', "/"));
                let actual = match obj.pointer(&pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (actual == *value) == *equal
            })
    }
}

/// Splits a label selector at the commas outside `in (...)` lists.
fn split_terms(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect()
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, ApiError> {
    let bad = || {
        ApiError::bad_request(format!("unable to parse requirement: invalid label selector term '{term}'"))
    };
    let set = |rest: &str| -> Result<Vec<String>, ApiError> {
        let inner = rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(key.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelRequirement::NotIn(k.trim().to_owned(), vec![v.trim().to_owned()]));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelRequirement::In(k.trim().to_owned(), vec![v.trim().to_owned()]));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(LabelRequirement::NotIn(k.trim().to_owned(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(LabelRequirement::In(k.trim().to_owned(), set(rest)?));
    }
    if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(bad());
    }
    Ok(LabelRequirement::Exists(term.to_owned()))
}
