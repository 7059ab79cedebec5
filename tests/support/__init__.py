"""What the test modules share: no test module imports another one.

- `tools`: real tools in subprocesses (`run`, `sh`, `bash`, `ls`, `sha256sum`), digests and
  errnos.
- `roots`: storage roots built through `storage/` (`link_blobs`, `build_root`).
- `snapshots`: what a storage root holds, to prove an operation changed nothing.
- `uploads`: where an upload's files lie in a root; starting one through a mount.
- `credentials`: a `docker-credential-<name>` helper on PATH.
- `servers`: the start/stop/context-manager shape of the helper servers.
- `mounts`: a real `regfs mount` (`Mount`, `wait_until`, `parse_getfattr`).
- `clients`: client loops against a mount whose daemon is killed (`kill_mid`).
- `sources`: `Source`, each registry implementation as the service tests see it.
- `registry`: the real docker-registry (`RegistryServer`, `RegistryClient`, its paths,
  tokens and media types).
- `oci`: OCI layouts built by umoci and copied by skopeo; `image_manifest` for blobs pushed
  by hand.
- `layers`: layer blobs built in Python (every tar entry kind; gzip, zstd, plain).
- `images`: images of hand-made tar layers (`umoci raw add-layer`) and `Tree` records of a
  root filesystem, unpacked, merged or mounted, to compare them.
- `loopback`, `fault_server`, `token_server`: HTTP servers on 127.0.0.1 in threads.
- `s3`: a real S3 server on 127.0.0.1 (moto in server mode), its clients and buckets, and
  the `storage: s3:` config of a registry on one of them.
- `users`: a second, unprivileged local user.
"""
