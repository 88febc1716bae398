//! The HTTP side: routing of API paths, bearer-token authentication, RBAC denials, the verbs
//! on objects, discovery documents, and watches as a stream of JSON lines.
//!
//! Routing is by hand rather than through a router crate: every Kubernetes resource path has
//! the same shape (`/api/v1` or `/apis/GROUP/VERSION`, optional `namespaces/NS`, then
//! `PLURAL[/NAME[/SUBRESOURCE]]`), so one parser covers all of them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::resources::{admit, ApiError, Resource, ALL, PODS};
use super::store::{Change, ChangeKind, Selectors};
use super::{streams, Shared, USER};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The API server's limit on a request body (3 MiB).
const BODY_LIMIT: usize = 3 << 20;
/// How long a watch lasts when the client names no timeout.
const DEFAULT_WATCH_SECONDS: u64 = 1800;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connection tasks here means aborting this task ends them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    // A client that goes away mid-request is no error of the server's.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).with_upgrades().await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    route(&shared, req).await.unwrap_or_else(|e| {
        json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
    })
}

pub fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("a JSON value serializes"));
    let mut resp = Response::new(Full::new(bytes).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok(body: &Value) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, body))
}

/// The query string as pairs, in order (exec repeats `command`).
pub type Query = Vec<(String, String)>;

pub fn param<'a>(query: &'a Query, key: &str) -> Option<&'a str> {
    query.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub fn flag(query: &Query, key: &str) -> bool {
    matches!(param(query, key), Some("true" | "1"))
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let expected = format!("Bearer {}", shared.token);
    if req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Err(ApiError::unauthorized());
    }
    let path = req.uri().path().to_owned();
    let query: Query =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["version"] => ok(&json!({
            "major": "1", "minor": "37", "gitVersion": "v1.37.0-devmount-fake", "platform": "linux/amd64",
        })),
        ["api"] => ok(&json!({ "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1" }] })),
        ["apis"] => {
            ok(&json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups().collect::<Vec<_>>() }))
        }
        ["api", version] => resource_list("", version),
        ["apis", group] => {
            groups().find(|g| g["name"] == *group).map_or_else(|| Err(ApiError::page_not_found()), |g| ok(&g))
        }
        ["apis", group, version] => resource_list(group, version),
        ["api", version, rest @ ..] => on_resource(shared, req, "", version, rest, query).await,
        ["apis", group, version, rest @ ..] => on_resource(shared, req, group, version, rest, query).await,
        _ => Err(ApiError::page_not_found()),
    }
}

fn groups() -> impl Iterator<Item = Value> {
    let mut names: Vec<(&str, &str)> =
        ALL.iter().filter(|r| !r.group.is_empty()).map(|r| (r.group, r.version)).collect();
    names.dedup();
    names.into_iter().map(|(group, version)| {
        let gv = json!({ "groupVersion": format!("{group}/{version}"), "version": version });
        json!({ "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv })
    })
}

fn resource_list(group: &str, version: &str) -> Result<Response<Body>, ApiError> {
    let resources: Vec<Value> = ALL
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| {
            let main = json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            });
            let subresources: &[&str] = if **r == *PODS { &["exec", "portforward", "status"] } else { &["status"] };
            let subs = subresources.iter().map(move |sub| {
                json!({ "name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced,
                        "kind": if *sub == "status" { r.kind } else { "PodExecOptions" }, "verbs": ["create", "get"] })
            });
            std::iter::once(main).chain(subs)
        })
        .collect();
    if resources.is_empty() {
        return Err(ApiError::page_not_found());
    }
    let gv = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    ok(&json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources }))
}

/// A request on `.../[namespaces/NS/]PLURAL[/NAME[/SUBRESOURCE]]`.
async fn on_resource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[&str],
    query: Query,
) -> Result<Response<Body>, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::page_not_found()),
    };
    let res = Resource::find(group, version, plural).ok_or_else(ApiError::page_not_found)?;
    if res.namespaced != namespace.is_some() && (name.is_some() || !res.namespaced) {
        return Err(ApiError::page_not_found());
    }
    let ns = namespace.unwrap_or("");
    let method = req.method().clone();
    let watch = flag(&query, "watch");
    let (verb, resource) = match (&method, name, sub) {
        (&Method::GET, None, None) => (if watch { "watch" } else { "list" }, res.plural.to_owned()),
        (&Method::GET, Some(_), None | Some("status")) => ("get", res.plural.to_owned()),
        (&Method::GET | &Method::POST, Some(_), Some(sub @ ("exec" | "portforward"))) if res == PODS => {
            ("create", format!("pods/{sub}"))
        }
        (&Method::POST, None, None) => ("create", res.plural.to_owned()),
        (&Method::PUT, Some(_), None) => ("update", res.plural.to_owned()),
        (&Method::PATCH, Some(_), None) => ("patch", res.plural.to_owned()),
        (&Method::DELETE, Some(_), None) => ("delete", res.plural.to_owned()),
        (_, _, Some(_)) => return Err(ApiError::page_not_found()),
        _ => return Err(ApiError::method_not_allowed(&format!("{method} {}", res.qualified()))),
    };
    if shared.lock().denials.contains(&(verb.to_owned(), resource.clone())) {
        return Err(ApiError::forbidden(res, &resource, verb, USER, namespace, name));
    }
    if param(&query, "dryRun").is_some() {
        return Err(ApiError::bad_request("dryRun is not supported by the fake API server"));
    }
    let name = name.unwrap_or("");
    match (verb, sub) {
        ("create", Some("exec")) => streams::exec(shared, req, ns, name, &query),
        ("create", Some(_)) => streams::port_forward(shared, req, ns, name, &query),
        ("get", _) => ok(shared.lock().store.get(res, ns, name)?),
        ("list", _) => {
            let selectors = Selectors::parse(param(&query, "labelSelector"), param(&query, "fieldSelector"))?;
            let state = shared.lock();
            let items: Vec<Value> = state
                .store
                .list(res, namespace, &selectors)
                .into_iter()
                .map(|mut item| {
                    // Items of a typed list carry no kind or apiVersion of their own.
                    if let Some(map) = item.as_object_mut() {
                        map.remove("kind");
                        map.remove("apiVersion");
                    }
                    item
                })
                .collect();
            ok(&json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": { "resourceVersion": state.store.resource_version().to_string() },
                "items": items,
            }))
        }
        ("watch", _) => watch_response(shared, res, namespace, &query),
        ("create", None) => {
            let body = read_json(req).await?;
            if let Some(given) = body.pointer("/metadata/namespace").and_then(Value::as_str) {
                if res.namespaced && given != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            let obj = admit(res, body, None)?;
            let created = shared.lock().store.create(res, ns, obj)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        ("update", _) => {
            let body = read_json(req).await?;
            let given = body.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            if given != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({given}) does not match the name on the URL ({name})"
                )));
            }
            let mut state = shared.lock();
            let old = state.store.get(res, ns, name)?.clone();
            let obj = admit(res, body, Some(&old))?;
            ok(&state.store.update(res, ns, name, obj)?)
        }
        ("patch", _) => {
            let content_type =
                req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let patch = read_json(req).await?;
            let mut state = shared.lock();
            let old = state.store.get(res, ns, name)?.clone();
            let patched = apply_patch(&content_type, old.clone(), &patch)?;
            let obj = admit(res, patched, Some(&old))?;
            ok(&state.store.update(res, ns, name, obj)?)
        }
        _ => {
            let options = read_json_or_empty(req).await?;
            let mut state = shared.lock();
            let current = state.store.get(res, ns, name)?;
            for (field, pointer) in
                [("uid", "/metadata/uid"), ("resourceVersion", "/metadata/resourceVersion")]
            {
                let wanted = options.pointer(&format!("/preconditions/{field}")).and_then(Value::as_str);
                if wanted.is_some_and(|w| Some(w) != current.pointer(pointer).and_then(Value::as_str)) {
                    return Err(ApiError::conflict(res, name));
                }
            }
            if res == PODS {
                return ok(&state.store.terminate_pod(ns, name)?);
            }
            let deleted = state.store.delete(res, ns, name)?;
            let mut details =
                json!({ "name": name, "kind": res.plural, "uid": deleted.pointer("/metadata/uid") });
            if !res.group.is_empty() {
                details["group"] = json!(res.group);
            }
            ok(
                &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details }),
            )
        }
    }
}

fn apply_patch(content_type: &str, mut obj: Value, patch: &Value) -> Result<Value, ApiError> {
    match content_type.split(';').next().unwrap_or("").trim() {
        "application/merge-patch+json" => {
            json_patch::merge(&mut obj, patch);
            Ok(obj)
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut obj, &ops).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!("the server rejected our request due to an error in our request: {e}"),
                details: None,
            })?;
            Ok(obj)
        }
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), BODY_LIMIT).collect().await.map(|b| b.to_bytes()).map_err(|e| ApiError {
        code: 413,
        reason: "RequestEntityTooLarge",
        message: format!("Request entity too large: limit is {BODY_LIMIT} ({e})"),
        details: None,
    })
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

async fn read_json_or_empty(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// What one watch sends: the kind, namespace and selectors it asked for.
struct WatchFilter {
    res: &'static Resource,
    namespace: Option<String>,
    selectors: Selectors,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        self.namespace.as_deref().is_none_or(|want| want == ns) && self.selectors.matches(obj)
    }

    /// The event a change makes for this watch: an object moving into or out of the selector
    /// is ADDED or DELETED, as the real watch cache reports it.
    fn event(&self, change: &Change) -> Option<Value> {
        if change.res != self.res {
            return None;
        }
        let was = change.old.as_ref().is_some_and(|old| self.matches(old));
        let is = self.matches(&change.new);
        let kind = match (change.kind, was, is) {
            (ChangeKind::Added, _, true) => "ADDED",
            (ChangeKind::Modified, true, true) => "MODIFIED",
            (ChangeKind::Modified, false, true) => "ADDED",
            (ChangeKind::Modified, true, false) => "DELETED",
            (ChangeKind::Deleted, _, true) => "DELETED",
            _ => return None,
        };
        Some(json!({ "type": kind, "object": change.new }))
    }
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("a JSON value serializes");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

struct WatchStream {
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
    cursor: u64,
    filter: WatchFilter,
    queue: VecDeque<Bytes>,
    deadline: Instant,
    done: bool,
}

fn watch_response(
    shared: &Arc<Shared>,
    res: &'static Resource,
    namespace: Option<&str>,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let filter = WatchFilter {
        res,
        namespace: namespace.map(str::to_owned),
        selectors: Selectors::parse(param(query, "labelSelector"), param(query, "fieldSelector"))?,
    };
    let seconds = match param(query, "timeoutSeconds") {
        Some(s) => s.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {s}")))?,
        None => DEFAULT_WATCH_SECONDS,
    };
    let state = shared.lock();
    let mut queue = VecDeque::new();
    let initial = flag(query, "sendInitialEvents");
    let cursor = match param(query, "resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0") {
        Some(rv) if !initial => {
            rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?
        }
        _ => {
            // From "now": the current objects first, as synthetic ADDED events.
            for obj in state.store.list(res, namespace, &filter.selectors) {
                queue.push_back(line(&json!({ "type": "ADDED", "object": obj })));
            }
            let rv = state.store.resource_version();
            if initial {
                queue.push_back(line(&json!({ "type": "BOOKMARK", "object": {
                    "kind": res.kind, "apiVersion": res.api_version(),
                    "metadata": { "resourceVersion": rv.to_string(), "annotations": { "k8s.io/initial-events-end": "true" } },
                } })));
            }
            rv
        }
    };
    let watch = WatchStream {
        shared: shared.clone(),
        changed: state.store.subscribe(),
        cursor,
        filter,
        queue,
        deadline: Instant::now() + Duration::from_secs(seconds),
        done: false,
    };
    drop(state);
    let body = StreamBody::new(stream::unfold(watch, next_watch_frame));
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn next_watch_frame(mut w: WatchStream) -> Option<(Result<Frame<Bytes>, Infallible>, WatchStream)> {
    loop {
        if let Some(bytes) = w.queue.pop_front() {
            return Some((Ok(Frame::data(bytes)), w));
        }
        if w.done {
            return None;
        }
        w.changed.borrow_and_update();
        {
            let state = w.shared.lock();
            match state.store.changes_since(w.cursor) {
                Ok(changes) => {
                    for change in changes {
                        w.cursor = change.rv;
                        if let Some(event) = w.filter.event(change) {
                            w.queue.push_back(line(&event));
                        }
                    }
                }
                Err(gone) => {
                    w.queue.push_back(line(&json!({ "type": "ERROR", "object": gone.status() })));
                    w.done = true;
                }
            };
        }
        if !w.queue.is_empty() {
            continue;
        }
        tokio::select! {
            changed = w.changed.changed() => if changed.is_err() { return None },
            _ = tokio::time::sleep_until(w.deadline) => return None,
        }
    }
}
