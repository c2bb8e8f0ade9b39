// Package web holds the browser page of the chat example: a chat UI and
// nanomesh.js, a dependency-free JavaScript client for the pomelo/nano wire
// protocol. Everything is embedded; the page loads nothing from the network
// besides its own files and the WebSocket.
//
// Mount it under a prefix, for example:
//
//	mux.Handle("/web/", http.StripPrefix("/web/", web.Handler("/nano")))
package web

import (
	"bytes"
	"embed"
	"html"
	"net/http"
	"path"
	"strings"
	"time"
)

// Assets holds the page's files: index.html, nanomesh.js, app.js, style.css.
//
//go:embed index.html nanomesh.js app.js style.css
var Assets embed.FS

// DefaultWSPath is the WebSocket path the page uses when Handler is given "".
const DefaultWSPath = "/nano"

// wsMeta is the tag in index.html that Handler rewrites.
const wsMeta = `<meta name="nanomesh-ws-path" content="/nano">`

var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
}

// modTime is when the process started; embedded files carry no time of their own.
var modTime = time.Now()

// Handler serves the page: "/" and "/index.html" give index.html with its
// nanomesh-ws-path meta tag set to wsPath (the path of the server's
// WebSocket endpoint on the same host), other paths the embedded files. The
// caller strips its mount prefix (http.StripPrefix); relative links in the
// page keep working under any prefix that ends in "/".
func Handler(wsPath string) http.Handler {
	if wsPath == "" {
		wsPath = DefaultWSPath
	}
	if !strings.HasPrefix(wsPath, "/") && !strings.Contains(wsPath, "://") {
		wsPath = "/" + wsPath
	}
	files := map[string][]byte{}
	for _, name := range []string{"index.html", "nanomesh.js", "app.js", "style.css"} {
		b, err := Assets.ReadFile(name)
		if err != nil {
			panic("web: missing embedded file " + name) // cannot happen: go:embed checked it
		}
		files[name] = b
	}
	meta := `<meta name="nanomesh-ws-path" content="` + html.EscapeString(wsPath) + `">`
	files["index.html"] = bytes.Replace(files["index.html"], []byte(wsMeta), []byte(meta), 1)

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := strings.TrimPrefix(path.Clean("/"+r.URL.Path), "/")
		if name == "" {
			name = "index.html"
		}
		b, ok := files[name]
		if !ok {
			http.NotFound(w, r)
			return
		}
		h := w.Header()
		h.Set("Content-Type", contentTypes[path.Ext(name)])
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		http.ServeContent(w, r, name, modTime, bytes.NewReader(b))
	})
}
