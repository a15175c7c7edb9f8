//! Request bodies parsed by hand, so every malformed body is a 400 `invalid` naming the field,
//! whatever its content type, and an empty body can mean "all defaults".

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body that must be there.
#[derive(Debug)]
pub struct Body<T>(pub T);

/// A JSON body that may be left out (or be empty), meaning `T::default()`.
#[derive(Debug)]
pub struct OptionalBody<T>(pub T);

/// The largest body cairn reads: requests are small JSON objects.
const MAX_BODY: usize = 1 << 20;

async fn bytes_of(request: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}"), None))
}

/// Parses JSON, naming the field at fault: from the path where the error was found, or from
/// serde's "missing field `x`" / "unknown field `x`".
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        // Unknown segments print as "?", the root as ".".
        let first = path.split(['.', '[']).next().unwrap_or("");
        let field = (!first.is_empty() && first != "?").then(|| first.to_string());
        invalid(e.into_inner(), field)
    })?;
    deserializer.end().map_err(|e| invalid(e, None))?;
    Ok(value)
}

fn invalid(e: serde_json::Error, field: Option<String>) -> ApiError {
    let message = e.to_string();
    // serde says "missing field `x`" / "unknown field `x`" without a path.
    let field = field.or_else(|| message.split('`').nth(1).map(str::to_string).filter(|_| message.contains("field `")));
    let what = if e.is_syntax() || e.is_eof() { "malformed JSON" } else { "invalid request" };
    ApiError::invalid(format!("{what}: {message}"), field)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = bytes_of(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid("the request needs a JSON body", None));
        }
        parse(&bytes).map(Body)
    }
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = bytes_of(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalBody(T::default()));
        }
        parse(&bytes).map(OptionalBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // The fields are read by serde's checks, which is what is tested.
    struct Request {
        name: String,
        size: u64,
    }

    fn field_of(json: &str) -> Option<String> {
        parse::<Request>(json.as_bytes()).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"name": "a", "size": "x"}"#).as_deref(), Some("size"));
        assert_eq!(field_of(r#"{"size": 1}"#).as_deref(), Some("name"));
        assert_eq!(field_of(r#"{"name": "a", "size": 1, "colour": 2}"#).as_deref(), Some("colour"));
        assert_eq!(field_of(r#"{"name": "a", "#), None);
        let e = parse::<Request>(b"{nope").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert!(parse::<Request>(br#"{"name": "a", "size": 1} trailing"#).is_err());
    }
}
