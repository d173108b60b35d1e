//! Binding the TCP listeners that a pod's neighbours reach: the operator's and the sidecar's
//! admin listener. The IPv6 wildcard `[::]` is bound dual-stack, so that one address serves
//! IPv4-only, dual-stack and IPv6-only pods.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;

/// Linux's `EAFNOSUPPORT`: the kernel has no IPv6 (booted with `ipv6.disable=1`).
const EAFNOSUPPORT: i32 = 97;
/// Linux's `EADDRNOTAVAIL`.
const EADDRNOTAVAIL: i32 = 99;

/// Binds a TCP listener on `address`. The IPv6 wildcard `[::]` is bound with `IPV6_V6ONLY`
/// off, so that it accepts IPv4 connections too. On a host without IPv6 it binds `0.0.0.0`
/// on the same port instead and logs a warning. Must run inside a Tokio runtime.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let SocketAddr::V6(v6) = address else {
        return bind_std(address);
    };
    if !v6.ip().is_unspecified() {
        return bind_std(address);
    }
    match bind_dual_stack(address) {
        Ok(listener) => Ok(listener),
        Err(error) if is_ipv6_unsupported(&error) => {
            let fallback = SocketAddr::from((Ipv4Addr::UNSPECIFIED, address.port()));
            tracing::warn!(%address, %fallback, %error, "IPv6 is not available on this host, so the listener takes IPv4 only");
            bind_std(fallback)
        }
        Err(error) => Err(error),
    }
}

fn bind_std(address: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn bind_dual_stack(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Tests whether a failed IPv6 bind means that the host has no IPv6 at all.
fn is_ipv6_unsupported(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ipv6_is_recognised() {
        for code in [EAFNOSUPPORT, EADDRNOTAVAIL] {
            let error = std::io::Error::from_raw_os_error(code);
            assert!(is_ipv6_unsupported(&error), "{error}");
        }
        // EADDRINUSE: the port is taken, which binding IPv4 instead would not fix.
        let in_use = std::io::Error::from_raw_os_error(98);
        assert!(!is_ipv6_unsupported(&in_use));
    }

    #[tokio::test]
    async fn wildcard_accepts_both_families() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let bound = listener.local_addr().unwrap();
        let mut targets = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, bound.port()))];
        // A host without IPv6 gets 0.0.0.0 instead, and then only IPv4 can be checked.
        if bound.is_ipv6() {
            targets.push(SocketAddr::from((
                std::net::Ipv6Addr::LOCALHOST,
                bound.port(),
            )));
        }
        for target in targets {
            let connect = tokio::net::TcpStream::connect(target);
            let (client, accepted) = tokio::join!(connect, listener.accept());
            client.unwrap_or_else(|e| panic!("{target}: {e}"));
            accepted.unwrap_or_else(|e| panic!("{target}: {e}"));
        }
    }

    #[tokio::test]
    async fn specific_address_is_bound_as_given() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(
            listener.local_addr().unwrap().ip(),
            std::net::IpAddr::from(Ipv4Addr::LOCALHOST)
        );
    }
}
