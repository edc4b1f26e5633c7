//! An in-memory Kubernetes API server for reconcile tests: it stores what is applied, answers
//! gets and label-selected lists, deletes, records every request, and refuses the requests a
//! test tells it to (a webhook, a quota).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<(Method, String)>,
    /// (method, path fragment, code, message): matching requests fail.
    refuse: Vec<(Method, String, u16, String)>,
    uid: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, message: &str) -> Response<Full<Bytes>> {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        _ => "Forbidden",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn ok(v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

/// Whether a path names one object (its last segment is a name) rather than a collection.
fn is_object(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/namespaces/ns/plural[/name] or /apis/g/v/namespaces/ns/plural[/name].
    let base = if parts[0] == "api" { 2 } else { 3 };
    let scoped = parts.get(base) == Some(&"namespaces");
    parts.len() > base + if scoped { 3 } else { 1 }
}

fn matches(labels: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        labels.get(k).and_then(Value::as_str) == Some(v)
    })
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let state = self.state.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn put(&self, path: &str, obj: Value) {
        self.state.lock().unwrap().objects.insert(path.into(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Changes a stored object in place.
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.state.lock().unwrap();
        f(s.objects
            .get_mut(path)
            .unwrap_or_else(|| panic!("no {path}")));
    }

    pub fn paths(&self, prefix: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn refuse(&self, method: Method, path_fragment: &str, code: u16, message: &str) {
        self.state.lock().unwrap().refuse.push((
            method,
            path_fragment.into(),
            code,
            message.into(),
        ));
    }

    pub fn requests(&self) -> Vec<(Method, String)> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<kube::client::Body>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let mut s = state.lock().unwrap();
    s.requests.push((parts.method.clone(), path.clone()));
    if let Some((_, _, code, msg)) = s
        .refuse
        .iter()
        .find(|(m, frag, _, _)| *m == parts.method && path.contains(frag.as_str()))
    {
        return status(*code, msg);
    }
    match parts.method {
        Method::PATCH => {
            let patch: Value = serde_json::from_slice(&body).expect("a JSON patch body");
            if let Some(base) = path.strip_suffix("/status") {
                let Some(obj) = s.objects.get_mut(base) else {
                    return status(404, "not found");
                };
                obj["status"] = patch["status"].clone();
                return ok(obj);
            }
            s.uid += 1;
            let uid = format!("uid-{}", s.uid);
            let obj = match s.objects.get(&path).cloned() {
                Some(mut old) => {
                    // Apply: the new spec; a changed spec is a new generation; status stays.
                    let changed = old.get("spec") != patch.get("spec");
                    let generation =
                        old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(changed);
                    for key in ["spec", "data", "subjects", "roleRef"] {
                        if let Some(v) = patch.get(key) {
                            old[key] = v.clone();
                        }
                    }
                    old["metadata"]["labels"] = patch["metadata"]["labels"].clone();
                    old["metadata"]["generation"] = json!(generation);
                    old
                }
                None => {
                    let mut new = patch.clone();
                    new["metadata"]["uid"] = json!(uid);
                    new["metadata"]["generation"] = json!(1);
                    new
                }
            };
            s.objects.insert(path.clone(), obj.clone());
            ok(&obj)
        }
        Method::GET if is_object(&path) => match s.objects.get(&path) {
            Some(obj) => ok(obj),
            None => status(404, "not found"),
        },
        Method::GET => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(urlencoding_decode)
                .unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.strip_prefix(&format!("{path}/"))
                        .is_some_and(|rest| !rest.contains('/'))
                })
                .filter(|(_, v)| matches(&v["metadata"]["labels"], &selector))
                .map(|(_, v)| v.clone())
                .collect();
            ok(
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        Method::DELETE => match s.objects.remove(&path) {
            Some(obj) => ok(&obj),
            None => status(404, "not found"),
        },
        Method::POST => {
            // Creates: events get a generated name, other objects keep theirs.
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            let name = match obj["metadata"]["name"].as_str() {
                Some(n) if !path.contains("/events") => n.to_string(),
                _ => format!("event-{}", s.requests.len()),
            };
            obj["metadata"]["name"] = json!(name);
            let at = format!("{path}/{name}");
            if s.objects.contains_key(&at) {
                return status(409, "already exists");
            }
            s.uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
            obj["metadata"]["generation"] = json!(1);
            s.objects.insert(at, obj.clone());
            ok(&obj)
        }
        _ => status(405, "not allowed"),
    }
}

/// Decodes a URL query value (labels hold only `%2C`, `%3D`, `%2F` and plain characters).
fn urlencoding_decode(v: &str) -> String {
    let mut out = String::new();
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap() as char);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' {
                ' '
            } else {
                bytes[i] as char
            });
            i += 1;
        }
    }
    out
}
