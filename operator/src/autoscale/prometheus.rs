//! Prometheus, as the planner reads it: instant queries over HTTP or HTTPS, with a bearer token
//! read from a file on each query (tokens rotate) and an optional CA bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("Prometheus at {url} is unreachable: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("Prometheus answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("cannot read the bearer token file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("an unexpected answer from Prometheus: {0}")]
    Answer(String),
}

impl PromError {
    /// The reason of the MetricsAvailable condition.
    pub fn reason(&self) -> &'static str {
        match self {
            PromError::Unreachable { .. } => "PrometheusUnreachable",
            PromError::Refused { .. } | PromError::Answer(_) => "PrometheusError",
            PromError::Token { .. } => "PrometheusCredentials",
        }
    }
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Clone, Debug)]
pub struct Prometheus {
    http: reqwest::Client,
    pub url: String,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Prometheus {
    pub fn client(ca_file: Option<&PathBuf>) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder().timeout(QUERY_TIMEOUT);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(b.build()?)
    }

    pub fn new(http: reqwest::Client, url: &str, token_file: Option<PathBuf>) -> Self {
        Prometheus {
            http,
            url: url.trim_end_matches('/').to_string(),
            token_file,
        }
    }

    /// An instant query's vector; NaN and infinite values (a quantile of nothing) are dropped.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>, PromError> {
        let mut req = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)]);
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| PromError::Token {
                path: path.display().to_string(),
                source,
            })?;
            req = req.bearer_auth(token.trim());
        }
        let unreachable = |source| PromError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let body = resp.text().await.map_err(unreachable)?;
        if !status.is_success() && status.as_u16() != 400 && status.as_u16() != 422 {
            return Err(PromError::Refused {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            });
        }
        parse(&body)
    }
}

fn parse(body: &str) -> Result<Vec<Sample>, PromError> {
    let answer: Answer =
        serde_json::from_str(body).map_err(|e| PromError::Answer(e.to_string()))?;
    if answer.status != "success" {
        return Err(PromError::Answer(answer.error.unwrap_or(answer.status)));
    }
    let data = answer
        .data
        .ok_or_else(|| PromError::Answer("no data".into()))?;
    if data.result_type != "vector" {
        return Err(PromError::Answer(format!(
            "a {} where a vector was expected",
            data.result_type
        )));
    }
    Ok(data
        .result
        .into_iter()
        .filter_map(|s| {
            let value = s.value.1.parse::<f64>().ok().filter(|v| v.is_finite())?;
            Some(Sample {
                labels: s.metric,
                value,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_read_and_nan_dropped() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"part":"queue"},"value":[1.5,"0.25"]},
            {"metric":{"part":"prefill"},"value":[1.5,"NaN"]}]}}"#;
        let v = parse(body).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].labels["part"].as_str(), v[0].value), ("queue", 0.25));
        let err = parse(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#);
        assert!(matches!(err, Err(PromError::Answer(m)) if m == "parse error"));
    }
}
