package web

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func get(t *testing.T, srv *httptest.Server, path string) (*http.Response, string) {
	t.Helper()
	resp, err := http.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func newServer(t *testing.T, wsPath string) *httptest.Server {
	mux := http.NewServeMux()
	mux.Handle("/web/", http.StripPrefix("/web/", Handler(wsPath)))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestIndexHasWSPath(t *testing.T) {
	srv := newServer(t, "/game/ws")
	for _, p := range []string{"/web/", "/web/index.html"} {
		resp, body := get(t, srv, p)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: status %d", p, resp.StatusCode)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Errorf("GET %s: Content-Type %q", p, ct)
		}
		if !strings.Contains(body, `<meta name="nanomesh-ws-path" content="/game/ws">`) {
			t.Errorf("GET %s: ws path not substituted:\n%s", p, body)
		}
		if strings.Contains(body, `content="/nano"`) {
			t.Errorf("GET %s: default ws path still present", p)
		}
		for _, id := range []string{`id="name"`, `id="join"`, `id="status"`, `id="members"`,
			`id="messages"`, `id="input"`, `id="send"`, `src="nanomesh.js"`, `src="app.js"`} {
			if !strings.Contains(body, id) {
				t.Errorf("GET %s: missing %s", p, id)
			}
		}
	}
}

func TestDefaultAndEscapedWSPath(t *testing.T) {
	_, body := get(t, newServer(t, ""), "/web/")
	if !strings.Contains(body, `<meta name="nanomesh-ws-path" content="/nano">`) {
		t.Errorf("empty wsPath: want /nano")
	}
	_, body = get(t, newServer(t, `/a"><script>`), "/web/")
	if strings.Contains(body, `"><script>`) || !strings.Contains(body, `content="/a&#34;&gt;&lt;script&gt;"`) {
		t.Errorf("wsPath not HTML-escaped")
	}
}

func TestAssets(t *testing.T) {
	srv := newServer(t, "/nano")
	for path, want := range map[string]string{
		"/web/nanomesh.js": "text/javascript",
		"/web/app.js":      "text/javascript",
		"/web/style.css":   "text/css",
	} {
		resp, body := get(t, srv, path)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: status %d", path, resp.StatusCode)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, want) {
			t.Errorf("GET %s: Content-Type %q, want %s", path, ct, want)
		}
		if len(body) == 0 {
			t.Errorf("GET %s: empty body", path)
		}
	}
	if _, body := get(t, srv, "/web/nanomesh.js"); !strings.Contains(body, "global.nanomesh") {
		t.Errorf("nanomesh.js: unexpected content")
	}
	for _, p := range []string{"/web/web.go", "/web/missing.js", "/web/../go.mod"} {
		if resp, _ := get(t, srv, p); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: status %d, want 404", p, resp.StatusCode)
		}
	}
}

func TestNoExternalResources(t *testing.T) {
	for _, name := range []string{"index.html", "nanomesh.js", "app.js", "style.css"} {
		b, err := Assets.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []string{"http://", "https://", "//cdn", "@import", "url("} {
			if strings.Contains(string(b), bad) {
				t.Errorf("%s references an external resource (%q)", name, bad)
			}
		}
	}
}
