//! Authentication of sidecars by the Kubernetes TokenReview API: a sidecar presents its
//! projected service-account token (audience `llmroute.dev`), and the API server returns
//! whose token it is. The caller may then write the routes of its own namespace.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use llmroute_control::auth::{AuthError, AuthFuture, Authenticator, Identity};

/// Prefix of a service account's user name in Kubernetes:
/// `system:serviceaccount:<namespace>:<name>`.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// Key of the pod name in the user info's `extra` of a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Checks tokens with TokenReview against one audience. Wrap it in a
/// [`CachedAuthenticator`](llmroute_control::auth::CachedAuthenticator): every call here is one
/// request to the API server.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: Client,
    audience: String,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Accepts service-account tokens for `audience`. The operator's service account needs
    /// `create` on `tokenreviews.authentication.k8s.io`.
    pub fn new(client: Client, audience: &str) -> Self {
        Self {
            client,
            audience: audience.to_string(),
        }
    }

    async fn review(&self, token: &str) -> Result<Identity, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };

        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                tracing::warn!(error = %error, "TokenReview request failed");
                AuthError::Unavailable(format!("TokenReview request failed: {error}"))
            })?;

        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid(status.error.unwrap_or_else(|| {
                "the API server did not authenticate the token".into()
            })));
        }
        // The API server returns the audiences it checked. A server that ignores
        // spec.audiences returns none, so its result does not prove the audience.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::WrongAudience {
                expected: self.audience.clone(),
                actual: audiences,
            });
        }

        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, account)) = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::Invalid(format!(
                "user {username:?} is not a service account; sidecars authenticate with their pod's service-account token"
            )));
        };
        let pod = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(POD_NAME_EXTRA))
            .and_then(|values| values.first());
        let name = match pod {
            Some(pod) => format!("{namespace}/{account} (pod {pod})"),
            None => format!("{namespace}/{account}"),
        };
        Ok(Identity {
            namespace: Some(namespace.to_string()),
            name,
        })
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(token))
    }
}
