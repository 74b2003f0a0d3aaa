"""An HTTP proxy on loopback that injects storage faults between GCS clients and the server.

Clients (gcsfs, tensorstore, orbax) are pointed at the proxy instead of fake-gcs-server (see
`client_env`); every request is forwarded to the server unless a rule says otherwise:

  proxy.fail(r'^POST /upload/.*checkpoint_3', status=503, times=2)  # the next 2 such requests
  proxy.fail(r'^GET .*train\.tsv', drop=True, every=3)   # every 3rd: connection closed, unanswered
  proxy.fail(r'^POST /upload/', drop_after=True, times=1)  # the server acts, the answer is lost
  proxy.fail(r'^GET ', delay=1.5, times=4)                # answers held back 1.5 s
  proxy.fail(r'^POST /upload/.*checkpoint_6', status=503)  # permanent: every match

A rule's pattern is searched in 'METHOD /path?query' (tensorstore names objects URL-encoded,
name=a%2Fb; gcsfs mostly as name=a/b). Rules are tried in order; the first that fires on a
request decides it. Each rule counts its matches and its faults (`rule.matched`,
`rule.injected`), so a test can check that the faults really happened. Standard library only;
it forwards to 127.0.0.1 and nothing else.

fake-gcs-server answers the repeat of a resumable upload's last chunk (after a lost answer) with
404 where GCS answers 200 with the object, so drop_after/delay rules should not hit those.
"""
from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse
from typing import List, Optional

# Hop-by-hop headers (RFC 9110 7.6.1) are each connection's own business; the proxy sets the
# framing (length, host) itself and answers `Expect: 100-continue` on its side.
_NOT_FORWARDED = {'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer',
                  'transfer-encoding', 'upgrade', 'content-length', 'host', 'expect'}
_REASONS = {429: 'Too Many Requests', 500: 'Internal Server Error', 502: 'Bad Gateway',
            503: 'Service Unavailable', 504: 'Gateway Timeout'}


@dataclasses.dataclass
class Rule:
  """Which requests to fault and how. `times=None` and `every=None`: every match (permanent)."""
  pattern: str
  status: Optional[int] = None  # answer with this HTTP status instead of forwarding
  drop: bool = False  # close the connection without an answer (the server never sees it)
  drop_after: bool = False  # forward it (the server acts on it), then close unanswered
  delay: float = 0.0  # forward, but hold the answer back this many seconds
  times: Optional[int] = None  # fault only the next `times` matches
  every: Optional[int] = None  # fault every `every`-th match (matches k, 2k, 3k ...)
  matched: int = 0
  injected: int = 0

  def __post_init__(self):
    if sum([self.status is not None, self.drop, self.drop_after, self.delay > 0]) != 1:
      raise ValueError('a rule needs exactly one of status=, drop=, drop_after=, delay=')
    self._re = re.compile(self.pattern)

  def matches(self, request_line: str) -> bool:
    return bool(self._re.search(request_line))

  def fires(self) -> bool:
    """Called on each match (under the proxy's lock): whether this one gets the fault."""
    self.matched += 1
    if self.times is not None and self.injected >= self.times:
      return False
    if self.every is not None and self.matched % self.every != 0:
      return False
    self.injected += 1
    return True


class FaultProxy:
  """Forwards HTTP from 127.0.0.1:<port> to `upstream` (a loopback URL), faulting by rule."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlsplit(upstream)
    if parsed.scheme != 'http' or parsed.hostname not in ('127.0.0.1', 'localhost'):
      raise ValueError(f'the fault proxy only forwards to http://127.0.0.1, not {upstream}')
    self.upstream = ('127.0.0.1', parsed.port)
    self.upstream_url = upstream.rstrip('/')
    self.rules: List[Rule] = []
    self.requests: List[str] = []  # 'METHOD /path?query' of every request seen
    self.abandoned: List[str] = []  # requests whose client hung up before the answer
    self._lock = threading.Lock()
    self._conns = set()
    self._server = _Server(('127.0.0.1', 0), _handler_for(self))
    self.port = self._server.server_address[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self._thread = threading.Thread(target=self._server.serve_forever, name='fault-proxy',
                                    kwargs={'poll_interval': 0.05}, daemon=True)
    self._thread.start()

  # ---- rules
  def fail(self, pattern: str, **kw) -> Rule:
    rule = Rule(pattern, **kw)
    with self._lock:
      self.rules.append(rule)
    return rule

  def clear(self) -> None:
    with self._lock:
      self.rules.clear()

  def injected(self) -> int:
    with self._lock:
      return sum(r.injected for r in self.rules)

  def _decide(self, request_line: str) -> Optional[Rule]:
    with self._lock:
      self.requests.append(request_line)
      for rule in self.rules:
        if rule.matches(request_line) and rule.fires():
          return rule
    return None

  # ---- lifecycle
  def client_env(self, server_env: dict) -> dict:
    """The server's client environment, with every endpoint pointing at the proxy."""
    return {k: (self.url if v == self.upstream_url else v) for k, v in server_env.items()}

  def stop(self) -> None:
    self._server.shutdown()
    with self._lock:
      conns = list(self._conns)
    for conn in conns:  # keep-alive connections would otherwise park their threads
      _close(conn)
    self._server.server_close()
    self._thread.join(timeout=5)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True


def _close(sock) -> None:
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
  sock.close()


def _handler_for(proxy: FaultProxy):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive, as GCS: clients reuse connections

    def setup(self):
      super().setup()
      with proxy._lock:  # pylint: disable=protected-access
        proxy._conns.add(self.connection)  # pylint: disable=protected-access

    def finish(self):
      with proxy._lock:  # pylint: disable=protected-access
        proxy._conns.discard(self.connection)  # pylint: disable=protected-access
      try:
        super().finish()
      except OSError:
        pass

    def log_message(self, *args):  # quiet: tests assert on proxy.requests instead
      pass

    def _body(self) -> bytes:
      if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        chunks = []
        while True:
          size = int(self.rfile.readline().split(b';')[0].strip(), 16)
          if size == 0:
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
              pass  # trailers
            return b''.join(chunks)
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
      return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _handle(self):
      body = self._body()
      rule = proxy._decide(f'{self.command} {self.path}')  # pylint: disable=protected-access
      if rule is not None and rule.drop:
        self.close_connection = True
        _close(self.connection)  # no status line, no bytes: a connection reset to the client
        return
      if rule is not None and rule.status is not None:
        self._reply_error(rule.status)
        return
      status, headers, payload = self._forward(body)
      if rule is not None and rule.drop_after:  # a lost answer: did it happen or not?
        self.close_connection = True
        _close(self.connection)
        return
      if rule is not None and rule.delay:
        time.sleep(rule.delay)
      try:
        self._reply(status, headers, payload)
      except OSError:  # the client gave up (its timeout), or the proxy is stopping
        self.close_connection = True
        with proxy._lock:  # pylint: disable=protected-access
          proxy.abandoned.append(f'{self.command} {self.path}')

    def _forward(self, body: bytes):
      conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
      try:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
        headers['Host'] = f'{proxy.upstream[0]}:{proxy.upstream[1]}'
        conn.request(self.command, self.path, body=body if body or self.command in (
            'POST', 'PUT', 'PATCH') else None, headers=headers)
        r = conn.getresponse()
        payload = r.read()
        return r.status, r.getheaders(), payload
      finally:
        conn.close()

    def _reply(self, status, headers, payload: bytes):
      self.send_response(status)
      for k, v in headers:
        if k.lower() in _NOT_FORWARDED or k.lower() in ('date', 'server'):  # send_response's
          continue
        if k.lower() == 'location':  # resumable uploads: keep the client on the proxy
          v = v.replace(proxy.upstream_url, proxy.url)
        self.send_header(k, v)
      if self.command == 'HEAD':  # no body, but the size of the one a GET would get
        length = next((v for k, v in headers if k.lower() == 'content-length'), '0')
      else:
        length = str(len(payload))
      self.send_header('Content-Length', length)
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(payload)

    def _reply_error(self, status: int):
      reason = _REASONS.get(status, 'Error')
      payload = json.dumps({'error': {'code': status, 'message': f'{reason} (injected)',
                                      'errors': [{'reason': 'backendError',
                                                  'message': f'{reason} (injected)'}]}})
      self._reply(status, [('Content-Type', 'application/json')], payload.encode())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

  return Handler
