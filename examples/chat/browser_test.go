package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// findChromium returns the path of a Chromium (or Chrome) binary. The
// browser test is part of the suite: a missing browser is a failure, not a
// skip.
func findChromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium not found: install it with `apt-get install -y chromium` (CI's .ci/run does)")
	return ""
}

// pageLog records what a tab fetched and any uncaught JavaScript exception.
type pageLog struct {
	mu         sync.Mutex
	urls       []string
	exceptions []string
}

func (l *pageLog) listen(ev any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch ev := ev.(type) {
	case *network.EventRequestWillBeSent:
		l.urls = append(l.urls, ev.Request.URL)
	case *network.EventWebSocketCreated:
		l.urls = append(l.urls, ev.URL)
	case *runtime.EventExceptionThrown:
		d := ev.ExceptionDetails
		msg := d.Text
		if d.Exception != nil && d.Exception.Description != "" {
			msg += " " + d.Exception.Description
		}
		l.exceptions = append(l.exceptions, msg)
	}
}

// jsString quotes s as a JavaScript string literal.
func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// TestChatBrowser drives two headless Chromium tabs through the chat page
// served by the node: both join, one sends a line, both show it.
func TestChatBrowser(t *testing.T) {
	chromium := findChromium(t)
	n := startChat(t)
	page := "http://" + n.WSAddr() + "/web/"

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox, // CI runs as root
		chromedp.DisableGPU,
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	watchdog := time.AfterFunc(30*time.Second, cancelAlloc) // never leave a browser behind
	defer watchdog.Stop()

	logA, logB := &pageLog{}, &pageLog{}
	tabA, cancelA := chromedp.NewContext(allocCtx, chromedp.WithListener(logA.listen))
	defer cancelA()
	if err := chromedp.Do(tabA); err != nil { // start the browser and open tab A
		t.Fatalf("start chromium (%s): %v", chromium, err)
	}
	tabB, cancelB := chromedp.NewContext(tabA, chromedp.WithListener(logB.listen)) // a second tab, same browser
	defer cancelB()
	if err := chromedp.Do(tabB); err != nil {
		t.Fatalf("open tab B: %v", err)
	}

	// Every step below shares one 20 s budget.
	deadline := time.Now().Add(20 * time.Second)
	ctxA, cancel := context.WithDeadline(tabA, deadline)
	defer cancel()
	ctxB, cancel := context.WithDeadline(tabB, deadline)
	defer cancel()

	poll := func(ctx context.Context, what, expr string) {
		t.Helper()
		if _, err := chromedp.Run(ctx, chromedp.Poll[bool](expr, chromedp.WithPollingInterval(20*time.Millisecond))); err != nil {
			t.Fatalf("%s: %v (waited for %s)", what, err, expr)
		}
	}
	join := func(ctx context.Context, tab, name string) {
		t.Helper()
		if err := chromedp.Do(ctx,
			chromedp.Navigate(page),
			chromedp.WaitVisible(chromedp.ID("name")),
			chromedp.SendKeys(chromedp.ID("name"), name),
			chromedp.Click(chromedp.ID("join")),
		); err != nil {
			t.Fatalf("tab %s: join: %v", tab, err)
		}
		poll(ctx, "tab "+tab+": status connected", `document.getElementById('status').textContent === 'connected'`)
	}

	join(ctxA, "A", "alice")
	idsA := sessionIDs(n)
	if len(idsA) != 1 {
		t.Fatalf("sessions after A joined: %v", idsA)
	}
	join(ctxB, "B", "bob")
	var idB int64
	for _, id := range sessionIDs(n) {
		if id != idsA[0] {
			idB = id
		}
	}
	if idB == 0 {
		t.Fatalf("no session for B: %v", sessionIDs(n))
	}

	// B's member list shows A; A is told of B by a system line.
	poll(ctxB, "tab B: A in #members", fmt.Sprintf(
		`Array.from(document.querySelectorAll('#members li')).some(li => li.textContent === %s)`, jsString(fmt.Sprint(idsA[0]))))
	poll(ctxA, "tab A: new user line", fmt.Sprintf(
		`Array.from(document.querySelectorAll('#messages .sys')).some(e => e.textContent.includes(%s))`,
		jsString(fmt.Sprintf("New user: %d", idB))))

	// A sends a line; both tabs show it as a .msg in #messages.
	const line = "hello from alice <b>not bold</b>"
	if err := chromedp.Do(ctxA,
		chromedp.WaitEnabled(chromedp.ID("input")),
		chromedp.SendKeys(chromedp.ID("input"), line),
		chromedp.Click(chromedp.ID("send")),
	); err != nil {
		t.Fatalf("tab A: send: %v", err)
	}
	hasLine := fmt.Sprintf(`Array.from(document.querySelectorAll('#messages .msg')).some(e => e.textContent === %s)`,
		jsString("alice: "+line))
	poll(ctxA, "tab A: own message", hasLine)
	poll(ctxB, "tab B: A's message", hasLine)
	// The line is text, never HTML.
	bold, err := chromedp.Run(ctxB, chromedp.Evaluate[int](`document.querySelectorAll('#messages .msg b b').length`))
	if err != nil || bold != 0 {
		t.Fatalf("message rendered as HTML (%d nested <b>): %v", bold, err)
	}
	input, err := chromedp.Run(ctxA, chromedp.Evaluate[string](`document.getElementById('input').value`))
	if err != nil || input != "" {
		t.Fatalf("input not cleared after send: %q %v", input, err)
	}

	// The page loaded nothing from outside the node.
	for tab, l := range map[string]*pageLog{"A": logA, "B": logB} {
		l.mu.Lock()
		urls, exceptions := slices.Clone(l.urls), slices.Clone(l.exceptions)
		l.mu.Unlock()
		if len(exceptions) > 0 {
			t.Errorf("tab %s: JavaScript exceptions: %v", tab, exceptions)
		}
		t.Logf("tab %s fetched %v", tab, urls)
		sawWS := false
		for _, raw := range urls {
			u, err := url.Parse(raw)
			if err != nil {
				t.Errorf("tab %s: bad URL %q", tab, raw)
				continue
			}
			if u.Scheme == "about" || u.Scheme == "data" {
				continue
			}
			if u.Hostname() != "127.0.0.1" {
				t.Errorf("tab %s: request outside 127.0.0.1: %s", tab, raw)
			}
			if u.Scheme == "ws" && u.Host == n.WSAddr() && u.Path == "/nano" {
				sawWS = true
			}
		}
		if !sawWS {
			t.Errorf("tab %s: no WebSocket to ws://%s/nano among %v", tab, n.WSAddr(), urls)
		}
		if !slices.ContainsFunc(urls, func(u string) bool { return strings.HasSuffix(u, "/web/nanomesh.js") }) {
			t.Errorf("tab %s: nanomesh.js not loaded: %v", tab, urls)
		}
	}
}
