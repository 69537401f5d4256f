//! The one error body over HTTP: an `ApiError` with its status. The status is the code's
//! (`ApiErrorCode::http_status`) except for the transport-level refusals that have no code of
//! their own (405, 408, 413), which carry `bad_request`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use vireo_api::{ApiError, ApiErrorCode, IllegalTransition};

use crate::StoreError;

#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub body: ApiError,
    /// Close the connection after the response (the request body was not read).
    pub close: bool,
}

impl HttpError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> HttpError {
        ApiError::new(code, message).into()
    }

    pub fn bad_request(message: impl Into<String>) -> HttpError {
        Self::new(ApiErrorCode::BadRequest, message)
    }

    pub fn conflict(message: impl Into<String>) -> HttpError {
        Self::new(ApiErrorCode::Conflict, message)
    }

    pub fn internal(message: impl Into<String>) -> HttpError {
        Self::new(ApiErrorCode::Internal, message)
    }

    /// A `bad_request` body with another status (405, 408, 413).
    pub fn with_status(status: StatusCode, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            body: ApiError::new(ApiErrorCode::BadRequest, message),
            close: false,
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(body: ApiError) -> HttpError {
        let status = StatusCode::from_u16(body.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        HttpError {
            status,
            body,
            close: false,
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> HttpError {
        if matches!(ApiError::from(&e).code, ApiErrorCode::Internal) {
            tracing::error!(error = %e, "store fault");
        }
        ApiError::from(&e).into()
    }
}

impl From<IllegalTransition> for HttpError {
    fn from(e: IllegalTransition) -> HttpError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// `axum::Json` whose rejections are our 400s (axum answers 415/422 with plain text).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> HttpError {
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            HttpError::bad_request("expected a JSON body with Content-Type: application/json")
        }
        JsonRejection::JsonDataError(e) => HttpError::bad_request(one_line(&e.body_text())),
        JsonRejection::JsonSyntaxError(e) => HttpError::bad_request(one_line(&e.body_text())),
        other => HttpError::bad_request(one_line(&other.body_text())),
    }
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A JSON body that may be absent (empty): `T::default()` then.
pub fn optional_json<T: DeserializeOwned + Default>(
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(HttpError::bad_request(
            "expected a JSON body with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))
}

/// `axum::extract::Path` with our 400 for a malformed segment.
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, HttpError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(HttpError::bad_request(one_line(&r.body_text()))),
        }
    }
}

/// `axum::extract::Query` with our 400 for a malformed or unknown parameter.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, HttpError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(HttpError::bad_request(one_line(&r.body_text()))),
        }
    }
}
